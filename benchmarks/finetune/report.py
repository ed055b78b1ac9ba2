"""The report of ``finetune.py``: tables (Markdown, JSON) and the accuracy-vs-memory frontier (PNG)."""

from __future__ import annotations

import statistics

from _common import machine, machine_line, save

from .methods import METHODS
from .tasks import SOURCES, TASKS


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def _peak_step(trace: list[float]) -> int:
    """The step during which the high-water mark came within 1 % (at least 1 MiB) of its final value."""
    final = trace[-1]
    return next(i + 1 for i, v in enumerate(trace) if v >= final - max(1.0, 0.01 * final))


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    """Per method: the seed-0 grid, the LR chosen on validation, and the seeds' statistics at that LR."""
    out = {}
    order = list(METHODS) + sorted({r["method"] for r in runs} - set(METHODS))
    for name in order:
        mine = [r for r in runs if r["method"] == name]
        grid = sorted((r for r in mine if r["seed"] == seeds[0]), key=lambda r: r["lr"])
        if not grid:
            continue
        best = max(grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
        at = sorted((r for r in mine if r["lr"] == best["lr"] and r["seed"] in seeds), key=lambda r: r["seed"])
        lrs = [r["lr"] for r in grid]
        out[name] = {
            "label": METHODS[name].label if name in METHODS else name,
            "grid": {f"{r['lr']:g}": {"val_acc": r["val_acc"], "val_loss": r["val_loss"]} for r in grid},
            "best_lr": best["lr"], "best_at_grid_edge": len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs)),
            "seeds": [r["seed"] for r in at],
            "test_acc": _stats([r["test_acc"] for r in at]), "val_acc": _stats([r["val_acc"] for r in at]),
            "peak_mib": _stats([r["peak_mib"] for r in at]), "wall_s": _stats([r["wall_s"] for r in at]),
            "step_s": _stats([r["step_s"] for r in at]),
            "trainable_max": best["trainable_max"], "trainable_end": best["trainable_end"],
            "trained_over_run": best["trained_over_run"], "n_weights": best["n_weights"],
            "peak_step": [_peak_step(r["peak_trace_mib"]) for r in at], "steps": best["steps"], "info": best["info"],
            "setup_peak_mib": best["setup_peak_mib"], "baseline_mib": best["baseline_mib"],
            "final_loss": _stats([statistics.fmean(r["loss_trace"][-10:]) for r in at]),
            "peak_after_step1_mib": _stats([r["peak_trace_mib"][0] for r in at]),
            "resident_end_mib": _stats([r["rss_trace_mib"][-1] for r in at]),
            "file_growth_mib": _stats([r.get("rss_file_growth_mib", float("nan")) for r in at]),
        }
        sw = best["info"].get("switch_step")
        if sw:  # CMD: the high-water mark just before the switch, and the recording
            out[name]["peak_before_switch_mib"] = _stats([r["peak_trace_mib"][sw - 2] for r in at if sw >= 2])
            out[name]["recording_mib"] = best["info"]["recording_bytes"] / 2**20
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _trainable(s: dict) -> str:
    a, b, u = s["trainable_max"], s["trainable_end"], s["trained_over_run"]
    if a != b:
        return f"{_count(a)} → {_count(b)}"
    if u > a:
        return f"{_count(a)} per step ({_count(u)} over the run)"
    return _count(a)


def _fmt_lr(x: float) -> str:
    return f"{x:g}"


def task_markdown(task: str, summ: dict, majority: dict, sig: dict, source: str) -> list[str]:
    full, lora = summ.get("full"), summ.get("lora")
    maj = majority["test"]
    lines = [
        f"### `{task}`: {source}",
        "",
        f"{sig['n_train']} training, {sig['n_val']} validation and {sig['n_test']} test examples; "
        f"majority class (the training set's most frequent, on test): **{maj:.3f}** "
        f"(validation {majority['val']:.3f}). {sig['steps']} steps of batch {sig['batch']} x {sig['max_length']} tokens.",
        "",
        "| method | LR (chosen on val.) | test accuracy: mean ± std (min–max), 3 seeds | share of full's gain over majority "
        "| trainable per step | whole-run peak MiB (min–max) | / LoRA | / full | peak reached at step | training wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summ.items():
        t = s["test_acc"]
        share = "-"
        if full and full["test_acc"]["mean"] - maj > 1e-9:
            share = f"{(t['mean'] - maj) / (full['test_acc']['mean'] - maj):.2f}"
        p = s["peak_mib"]
        rl = f"{p['mean'] / lora['peak_mib']['mean']:.2f}" if lora else "-"
        rf = f"{p['mean'] / full['peak_mib']['mean']:.2f}" if full else "-"
        edge = " (edge)" if s["best_at_grid_edge"] else ""
        n = f", n = {t['n']}" if t["n"] != 3 else ""
        steps = sorted(set(s["peak_step"]))
        lines.append(
            f"| {name} | {_fmt_lr(s['best_lr'])}{edge} | {t['mean']:.3f} ± {t['std']:.3f} ({t['min']:.3f}–{t['max']:.3f}{n}) "
            f"| {share} | {_trainable(s)} | {p['mean']:.0f} ({p['min']:.0f}–{p['max']:.0f}) | {rl} | {rf} "
            f"| {', '.join(map(str, steps))} of {s['steps']} | {s['wall_s']['mean']:.0f} |")
    lines += ["", "Where the memory goes (MiB above the loaded model, means over the seeds):", "",
              "| method | high-water mark after step 1 | before CMD's switch | whole-run peak | resident at the last step "
              "| CMD's warm-up recording |", "|---|---|---|---|---|---|"]
    for name, s in summ.items():
        before = f"{s['peak_before_switch_mib']['mean']:.0f} (switch at step {s['info']['switch_step']})" \
            if "peak_before_switch_mib" in s else "-"
        rec = f"{s['recording_mib']:.0f}" if "recording_mib" in s else "-"
        lines.append(f"| {name} | {s['peak_after_step1_mib']['mean']:.0f} | {before} | {s['peak_mib']['mean']:.0f} "
                     f"| {s['resident_end_mib']['mean']:.0f} | {rec} |")
    width = max(len(s["grid"]) for s in summ.values())
    lines += ["", "Learning-rate grid, seed 0, validation accuracy (**←** chosen; *+* a step beyond the method's "
              "grid, tried because the best was at its end):", "",
              "| method | " + " | ".join(["LR: val. acc."] * width) + " |", "|---" * (width + 1) + "|"]
    for name, s in summ.items():
        own = {float(x) for x in METHODS[name].grid} if name in METHODS else set()
        cells = [f"{lr}{'' if float(lr) in own else ' *+*'}: {v['val_acc']:.3f}"
                 + (" **←**" if float(lr) == s["best_lr"] else "") for lr, v in s["grid"].items()]
        lines.append(f"| {name} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    lines.append("")
    return lines


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in results if results[t]["methods"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.6), squeeze=False)
    colors = {"full": "C0", "lora": "C1", "bitfit": "C2", "badam": "C4", "cmd": "C3", "cmd_bf16": "C5"}
    for ax, task in zip(axes[0], tasks):
        res = results[task]
        for i, (name, s) in enumerate(res["methods"].items()):
            t, p = s["test_acc"], s["peak_mib"]
            ax.errorbar([p["mean"]], [t["mean"]], yerr=[[t["mean"] - t["min"]], [t["max"] - t["mean"]]],
                        xerr=[[p["mean"] - p["min"]], [p["max"] - p["mean"]]], fmt="o", capsize=4,
                        color=colors.get(name, f"C{i % 10}"), label=name)
            left = name.endswith("_bf16")  # next to its float32 twin: label it on the other side
            ax.annotate(name, (p["mean"], t["mean"]), textcoords="offset points", xytext=(-7 if left else 7, 4),
                        ha="right" if left else "left", fontsize=9)
        ax.axhline(res["majority"]["test"], ls="--", color="grey", lw=1)
        ax.annotate("majority class", (0.01, res["majority"]["test"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")
        ax.set_xscale("log")
        ticks = [t for t in (50, 100, 200, 300, 500, 1000, 1500, 2000, 3000, 5000, 10000)
                 if min(v["peak_mib"]["min"] for v in res["methods"].values()) / 1.3 <= t
                 <= max(v["peak_mib"]["max"] for v in res["methods"].values()) * 1.3]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("whole-run peak memory above the loaded model (MiB, log)")
        ax.set_ylabel("test accuracy (mean, min–max over 3 seeds)")
        ax.set_title(f"MiniLM-L6 fine-tuned on {task}")
        ax.grid(alpha=0.3, which="both")
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo / 1.08, hi * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def report(args, sigs: dict, load_runs) -> None:
    m = machine()
    m["torch_threads"] = args.threads
    results, md = {}, []
    for task in TASKS:
        runs = [r for r in load_runs(args.out, task) if r["sig"] == sigs[task]]
        if not runs:
            continue
        summ = summarize(runs, args.seeds)
        majority = runs[0]["majority"]
        source = SOURCES[task]
        results[task] = {"sig": sigs[task], "majority": majority, "source": source, "methods": summ,
                         "n_runs": len(runs), "run_wall_s": sum(r["process_s"] for r in runs)}
        md += task_markdown(task, summ, majority, sigs[task], source)
        used = {(n, v["best_lr"]) for n, v in summ.items()}
        stale = [r for r in runs if r["seed"] != args.seeds[0] and (r["method"], r["lr"]) not in used]
        md += [f"{len(runs)} runs, {results[task]['run_wall_s'] / 60:.0f} min of process time"
               + (f"; {len(stale)} seed runs at learning rates that a later grid extension displaced are in the "
                  "run file but not used" if stale else "") + ".", ""]
    if not results:
        print(f"no runs in {args.out} for this setting")
        return
    head = [
        "# Cheap fine-tuning, measured: MiniLM-L6 on two real text tasks (issue #20)",
        "",
        "Generated by `benchmarks/finetune.py` (see its docstring for the protocol).",
        f"Machine: {machine_line(m)}. Device: {args.device}.",
        "",
        "Methods (LR grid on seed 0, the best by validation accuracy — while it is at an end of the grid, up to two "
        "more steps of the 1-3-10 ladder beyond it — then seeds 1 and 2 at it):",
        "",
        "| method | what | LR grid |",
        "|---|---|---|",
    ]
    for name, meth in METHODS.items():
        if any(name in r["methods"] for r in results.values()):
            what = meth.label + (f" — {meth.notes}" if meth.notes else "")
            head.append(f"| {name} | {what} | {', '.join(_fmt_lr(x) for x in meth.grid)} |")
    head += ["", "*Whole-run peak*: the process's peak resident memory over the whole training (from the method's "
             "set-up to the last step) minus the resident memory once the model was loaded, the data tokenized and "
             "one no-grad forward pass run (which pages in ~60 MiB of code that inference needs as well). "
             "On CPU it includes the activations kept for the backward pass, gradients, optimizer state, "
             "and any recording or decomposition, and file-backed pages (code) first touched during training "
             "(30–40 MiB where the pretrained weights stay frozen; `rss_file_growth_mib` per run in the JSONL). "
             "*Share of full's gain*: (accuracy − majority) / (full fine-tune's accuracy − majority), on the means. "
             "*(edge)*: the chosen LR is at the end of its grid. *Peak reached at step*: the step during which the "
             "high-water mark came within 1 % of its final value (per seed).", ""]
    md = head + md
    text = "\n".join(md)
    print("\n" + text)
    if not getattr(args, "quick", False) or args.out is not None:
        save("finetune", {"machine": m, "args": {k: (str(v) if not isinstance(v, (int, float, str, list, type(None))) else v)
                                                for k, v in vars(args).items()}, "tasks": results}, text, args.out)
        plot(results, args.out / "finetune.png")
