"""Cheap fine-tuning, measured (issue #20): accuracy against whole-run peak memory of fine-tuning
recipes for the pretrained MiniLM-L6 (22.7 M weights, every weight trainable as loaded) on two
real text tasks that ship inside installed packages.

    python benchmarks/finetune.py                       # the whole grid, both tasks, one after the other
    python benchmarks/finetune.py --tasks reviews --resume &   # one task per process, side by side
    python benchmarks/finetune.py --tasks debates --resume &
    python benchmarks/finetune.py --report-only         # rebuild the report from the run files
    python benchmarks/finetune.py --quick               # a tiny smoke setting (tests/test_finetune_bench.py)

Tasks: ``reviews`` (Rotten Tomatoes, fresh/rotten) and ``debates`` (2016 US debates, party of the
speaker), each split into train / validation / test. Every method gets the same steps (2 epochs
over 800 training examples = 100 steps of batch 16 x 64 tokens), AdamW with weight decay 0.01 and
a linear decay of the learning rate to 0. Methods: ``finetune/methods.py`` (a registry; a new
recipe is one function).

Protocol, per task and method: the method's 3 learning rates on seed 0, the best by validation
accuracy (while it is at an end of the grid, up to two more steps of the 1-3-10 ladder beyond it
are tried, ``--extend``), then seeds 1 and 2 at that learning rate (a seed fixes the data order and the fresh
head's init; the pretrained body is always the same). Test accuracy is reported as the mean over
the 3 seeds with its std and min/max.

Every run is a fresh process (glibc's mmap threshold fixed, MALLOC_MMAP_THRESHOLD_=65536, as in
memory.py, so that freed blocks leave RSS) with ``--threads`` torch threads. The whole-run peak
memory is the process's VmHWM over the whole training, reset (``/proc/self/clear_refs`` = 5) once
the model is loaded and the data tokenized, minus the RSS at that moment; with ``--device cuda``
it is ``torch.cuda.max_memory_allocated`` minus the memory allocated at that moment. Each
finished run is appended as one JSON line to ``<out>/finetune_<task>.jsonl``; ``--resume`` skips
the runs already there (without it an existing file is moved aside).

Report: ``<out>/finetune.{json,md,png}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# per task: training, validation and test examples
SIZES = {"reviews": (800, 400, 1000), "debates": (800, 250, 500)}
QUICK = {"n": 32, "steps": 6, "max_length": 16, "methods": ["full", "lora", "cmd"]}


def _sig(args, task: str) -> dict:
    n_train, n_val, n_test = args.sizes[task]
    return {"n_train": n_train, "n_val": n_val, "n_test": n_test, "steps": args.steps, "batch": args.batch,
            "max_length": args.max_length, "device": args.device}


def _key(task: str, method: str, lr: float, seed: int, sig: dict) -> str:
    return json.dumps([task, method, float(lr), int(seed), sig], sort_keys=True)


def load_runs(out: Path, task: str) -> list[dict]:
    f = out / f"finetune_{task}.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _child(spec: dict, log_dir: Path) -> dict | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{spec['task']}_{spec['method']}_lr{spec['lr']:g}_s{spec['seed']}"
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tmp:
        result_path = tmp.name
    try:
        with open(log_dir / f"{name}.log", "w") as log:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--child-out", result_path],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        text = Path(result_path).read_text()
        if proc.returncode or not text.strip():
            tail = (log_dir / f"{name}.log").read_text()[-3000:]
            print(f"  FAILED {name} (exit {proc.returncode}); log {log_dir / (name + '.log')}:\n{tail}", flush=True)
            return None
        return json.loads(text)
    finally:
        os.unlink(result_path)


def best_run(runs: list[dict]) -> dict:
    """The run with the best validation accuracy (ties: the lower validation loss)."""
    return max(runs, key=lambda r: (r["val_acc"], -r["val_loss"]))


def next_lr(lr: float, direction: int) -> float:
    """The next learning rate on the 1-3-10 ladder: 1e-4 -> 3e-4 -> 1e-3 (direction +1), or down (-1)."""
    e = math.floor(math.log10(lr) + 1e-9)
    mant = lr / 10**e
    if direction > 0:
        return float(f"{3 * 10**e if mant < 2 else 10 ** (e + 1):.0e}")
    return float(f"{3 * 10 ** (e - 1) if mant < 2 else 10**e:.0e}")


def run_task(args, task: str) -> None:
    from finetune.methods import METHODS

    out = args.out
    sig = _sig(args, task)
    n_train, n_val, n_test = args.sizes[task]
    path = out / f"finetune_{task}.jsonl"
    done = {_key(r["task"], r["method"], r["lr"], r["seed"], r["sig"]): r for r in load_runs(out, task)}
    if path.exists() and not args.resume:
        aside = path.with_suffix(f".jsonl.{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        print(f"moved the existing {path.name} aside to {aside.name} (use --resume to continue it)")
        done = {}
    out.mkdir(parents=True, exist_ok=True)
    t_task = time.perf_counter()

    def one(method: str, lr: float, seed: int) -> dict | None:
        k = _key(task, method, lr, seed, sig)
        if k in done:
            return done[k]
        spec = {"task": task, "method": method, "lr": lr, "seed": seed, "sig": sig, "n_train": n_train,
                "n_val": n_val, "n_test": n_test, "steps": args.steps, "batch": args.batch,
                "max_length": args.max_length, "threads": args.threads, "device": args.device}
        t = time.perf_counter()
        r = _child(spec, args.log_dir)
        if r is None:
            return None
        r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        done[k] = r
        print(f"  {task:8s} {method:9s} lr {lr:<7g} seed {seed}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} "
              f"peak {r['peak_mib']:7.1f} MiB (step {r['peak_step']}) train {r['wall_s']:6.1f} s, "
              f"process {time.perf_counter() - t:6.1f} s", flush=True)
        return r

    for name in args.methods:
        m = METHODS[name]
        grid = [args.lr] if args.lr is not None else ([m.grid[len(m.grid) // 2]] if args.quick else list(m.grid))
        runs = [r for r in (one(name, lr, args.seeds[0]) for lr in grid) if r is not None]
        if not runs:
            continue
        for _ in range(args.extend if len(grid) > 1 else 0):  # the best LR at an end of the grid: one step further
            best, lrs = best_run(runs), sorted(r["lr"] for r in runs)
            new = next_lr(lrs[-1], +1) if best["lr"] == lrs[-1] else next_lr(lrs[0], -1) if best["lr"] == lrs[0] else None
            r = one(name, new, args.seeds[0]) if new is not None else None
            if r is None:
                break
            runs.append(r)
        best = best_run(runs)
        for seed in args.seeds[1:]:
            one(name, best["lr"], seed)
    print(f"{task}: done in {(time.perf_counter() - t_task) / 60:.1f} min", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one runs the LR grid")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every method instead of the grids")
    ap.add_argument("--extend", type=int, default=2,
                    help="when the best LR on seed 0 is at an end of the method's grid, try up to this many further "
                         "steps of the 1-3-10 ladder in that direction (0: the grid only)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=None, help="default: epochs x n_train / batch")
    ap.add_argument("--n-train", type=int, default=None, help="training examples of every task (default 800)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in the run files")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke setting: {QUICK['n']} examples per split, {QUICK['steps']} steps, "
                         f"max_length {QUICK['max_length']}, methods {QUICK['methods']}, one LR, one seed")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results (--quick: /tmp/finetune-quick)")
    ap.add_argument("--log-dir", type=Path, default=None, help="the children's output (default <tmp>/finetune-logs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if args.child:
        from finetune.run import run

        r = run(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(r))
        return

    from finetune.methods import METHODS
    from finetune.report import report

    if args.quick:
        args.sizes = {t: (QUICK["n"],) * 3 for t in SIZES}
        args.steps = args.steps or QUICK["steps"]
        args.max_length = QUICK["max_length"]
        args.seeds = args.seeds[:1]
        args.methods = args.methods or QUICK["methods"]
        args.out = args.out or Path(tempfile.gettempdir()) / "finetune-quick"
    else:
        args.sizes = {t: ((args.n_train or s[0]),) + s[1:] for t, s in SIZES.items()}
        n_train = {s[0] for t, s in args.sizes.items() if t in args.tasks}
        if args.steps is None:
            if len(n_train) != 1:
                raise SystemExit("give --steps when the tasks' training sets differ")
            args.steps = int(round(args.epochs * n_train.pop() / args.batch))
        args.methods = args.methods or list(METHODS)
        args.out = args.out or HERE / "results"
    args.log_dir = args.log_dir or Path(tempfile.gettempdir()) / "finetune-logs"
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}: {sorted(METHODS)}")
    if not args.report_only:
        print(f"{args.steps} steps of batch {args.batch} x {args.max_length} tokens, {args.threads} thread(s), "
              f"device {args.device}; results in {args.out}", flush=True)
        for task in args.tasks:
            run_task(args, task)
    report(args, {t: _sig(args, t) for t in SIZES}, load_runs)


if __name__ == "__main__":
    main()
