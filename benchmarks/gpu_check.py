"""One-shot GPU check of modeopt: tests, step time, memory and switch time, against the targets.

Made for a session that holds one GPU for a few minutes: everything runs from one command, every
part has a time cap (rounds are cut rather than overrunning), and a part that fails records its
error and the script goes on. The whole run stays under ``--budget`` seconds (default 540: under 10
minutes on one H200, with the start-up).

    PYTHONPATH=. python3 benchmarks/gpu_check.py                       # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --device cpu  # rehearsal, ~2 minutes

Parts:

a. ``pytest -q -m cuda`` over tests/test_cuda.py, test_online_cuda.py, test_device.py, test_triton_kernels.py, test_blockwise.py in a
   subprocess, with ``MODEOPT_TEST_DEVICE=--device``: outcome per test, counts, tail of the output.
b. Step time, plain vs. mode space, side by side in one process: medians over interleaved rounds
   (the order alternates every round; warm-up rounds excluded) of embedded step / plain step, for
   AdamW (fused=True) and SGD + momentum, on ResNet50 (batch 128, 224x224, bf16 autocast,
   channels_last) and a GPT-2-small-sized causal LM (``GPT2Config()``, random init, seq 512, batch 8,
   bf16 autocast). Both models start from identical weights; both take the same warm-up steps; the
   CMD one switches (warmup_steps=6, snapshot_every=2, M=10, ``exclude=lambda n, p: p.ndim < 2``).
c. Peak ``torch.cuda.max_memory_allocated`` per phase on the GPT-2 model at batch 8 (plain AdamW,
   CMD warm-up, the switch, CMD embedded) and the bytes of mode space (a + labels) per embedded
   weight. On CPU (rehearsal) the peak resident set size stands in.
d. Switch time per 100 M weights with T = 20 snapshots (``benchmarks/switch_time.py``'s
   ``measure_switch`` if present, else ``modeopt.decompose`` of a planted (N, 20) trajectory;
   measured at a small N first and at 100 M only if that fits the part's time, else extrapolated).
h. Exact half precision (issue 25): bf16 weights in mode space formed from their frozen switch-time
   value in each forward against the in-place update it replaced (``ModeSpace.HALF_FORMED = False``)
   and plain AdamW on the bf16 weights, ResNet18 (batch 64, 32x32) and a MiniLM-L12-H384-shaped BERT
   (batch 32, seq 64), with ``benchmarks/half_precision_step_time.py``'s models: step-time ratio
   formed / in-place (median over interleaved rounds) and the peak ``max_memory_allocated`` of three
   steps above the allocation before them, also without the re-forming in backward (``formed_kept``).
e. The targets: embedded/plain step <= 1.00 (AdamW fused), <= 1.05 (SGD + momentum); mode space
   <= 3 B per embedded weight; embedded-phase peak <= 0.6x plain AdamW's (GPT-2, batch 8); switch
   <= 2 s per 100 M weights.

Results: ``benchmarks/results/gpu.{json,md}`` (``gpu_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _common import RESULTS, machine, machine_line, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402

import modeopt  # noqa: E402

T0 = time.perf_counter()
TARGETS = {
    "step_adamw_fused": 1.00,
    "step_sgd_momentum": 1.05,
    "mode_space_bytes_per_weight": 3.0,
    "embedded_peak_over_plain_adamw": 0.6,
    "switch_s_per_100M": 2.0,
}
CMD_KW = dict(n_modes=10, warmup_steps=6, snapshot_every=2, seed=0, progress=False, exclude=lambda n, p: p.ndim < 2,
              coef_dtype=torch.float32)  # --coef-dtype bfloat16 sets it


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


class Clock:
    """The script's overall deadline, and per-part deadlines inside it."""

    def __init__(self, budget: float):
        self.end = T0 + budget

    def left(self) -> float:
        return self.end - time.perf_counter()

    def deadline(self, cap: float, reserve: float = 0.0) -> float:
        """Now + cap, but never past the overall end minus what later parts need."""
        return min(time.perf_counter() + cap, self.end - reserve)


def run_part(results: dict, name: str, fn, *args) -> None:
    log(f"--- part {name}")
    t = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - one part's failure must not end the check
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        log(f"part {name} FAILED: {type(e).__name__}: {str(e)[:300]}")
    results[name]["part_seconds"] = round(time.perf_counter() - t, 1)
    log(f"part {name} took {results[name]['part_seconds']} s")


# ----------------------------------------------------------------------------------- a. tests
def part_tests(args, cap: float) -> dict:
    wanted = ["tests/test_cuda.py", "tests/test_online_cuda.py", "tests/test_device.py", "tests/test_triton_kernels.py",
              "tests/test_blockwise.py"]
    files = [f for f in wanted if (ROOT / f).exists()]
    missing = [f for f in wanted if not (ROOT / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEsxXp", "--tb=short", "-p", "no:logging",
           "-p", "no:cacheprovider", *files]
    env = dict(os.environ, MODEOPT_TEST_DEVICE=args.device, COLUMNS="250", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    log(f"running {' '.join(cmd[1:])} (cap {cap:.0f} s)")
    t = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        timed_out = True
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        out, rc = text(e.stdout) + text(e.stderr), None
    seconds = time.perf_counter() - t
    counts = {}
    tail_line = [ln for ln in out.strip().splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if tail_line:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", tail_line[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    outcomes = {}
    for ln in out.splitlines():
        m = re.match(r"^SKIPPED \[\d+\] (\S+?):? (.*)", ln)  # SKIPPED [1] tests/x.py:12: reason
        if m:
            outcomes[m.group(1)] = {"outcome": "SKIPPED", "detail": m.group(2)[:300]}
            continue
        m = re.match(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS)\s+(\S+)(?:\s+-\s+(.*))?", ln)
        if m:
            outcomes[m.group(2)] = {"outcome": m.group(1), "detail": (m.group(3) or "")[:300]}
    log(f"pytest: rc {rc}, {counts}, {seconds:.0f} s" + (" (TIMED OUT)" if timed_out else ""))
    return {"command": " ".join(cmd[1:]), "files": files, "missing_files": missing, "returncode": rc,
            "timed_out": timed_out, "seconds": round(seconds, 1), "counts": counts, "outcomes": outcomes,
            "tail": out[-6000:]}


# ------------------------------------------------------------------------------- models
def make_resnet(args, dev):
    from torchvision.models import resnet18, resnet50

    batch, size = (4, 32) if args.smoke else (128, 224)
    torch.manual_seed(0)
    model = (resnet18(num_classes=10) if args.smoke else resnet50()).to(dev)
    classes = 10 if args.smoke else 1000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    name = f"{'resnet18' if args.smoke else 'resnet50'}, batch {batch}, {size}x{size}" + (
        ", channels_last" if args.channels_last else "")
    return name, model, lambda m: F.cross_entropy(m(x), y)


def make_gpt2(args, dev):
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.smoke:
        cfg, batch, seq = GPT2Config(n_embd=64, n_layer=2, n_head=2), 4, 32
    else:
        cfg, batch, seq = GPT2Config(), args.gpt2_batch, 512
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(dev)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    name = f"GPT-2 (n_embd {cfg.n_embd}, {cfg.n_layer} layers), batch {batch}, seq {seq}"
    return name, model, lambda m: m(input_ids=ids, labels=ids).loss


MODELS = {"resnet": make_resnet, "gpt2": make_gpt2}
OPTIMIZERS = {
    "adamw_fused": ("AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True)),
    "sgd_momentum": ("SGD + momentum", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
}


def stepper(model, opt, loss_fn, dev):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        return loss
    return step


def timed(fn, dev) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- b. step time
def one_step_config(args, dev, model_key, opt_key, deadline, hard_end) -> dict:
    name, proto, loss_fn = MODELS[model_key](args, dev)
    label, make = OPTIMIZERS[opt_key]
    plain = proto
    cmd_model = copy.deepcopy(proto)  # identical weights
    plain_opt = make(plain.parameters())
    cmd_opt = modeopt.CMDOptimizer(cmd_model, make(cmd_model.parameters()), **CMD_KW)
    n_weights = sum(p.numel() for p in plain.parameters())
    run_plain, run_cmd = stepper(plain, plain_opt, loss_fn, dev), stepper(cmd_model, cmd_opt, loss_fn, dev)
    log(f"{name} / {label}: {n_weights:,} weights; warm-up {CMD_KW['warmup_steps']} steps each")
    warm_plain, warm_cmd = [], []
    for _ in range(CMD_KW["warmup_steps"]):  # same steps for both: same point of training
        warm_plain.append(timed(run_plain, dev))
        warm_cmd.append(timed(run_cmd, dev))
    assert cmd_opt.phase == "embedded", cmd_opt.phase
    switch_step = warm_cmd[-1]
    embedded = sum(p.numel() for p in cmd_model.parameters() if not p.requires_grad)
    trainable = cmd_opt.trainable_parameters()
    loss_now = float(run_cmd().detach().float())  # first embedded step (allocations)
    run_plain()
    rounds, per_round = args.rounds, args.steps_per_round
    ratios, t_plain, t_cmd = [], [], []
    r = 0
    while r < rounds + args.warm_rounds:
        now = time.perf_counter()
        # the setup (model, warm-up, switch) cannot be cut: past this configuration's deadline, the
        # rounds stop once a minimum was timed, and at the part's hard end in any case
        if (now > deadline and len(ratios) >= args.min_rounds) or (now > hard_end and r > 0):
            break
        order = [("plain", run_plain), ("cmd", run_cmd)]
        if r % 2:
            order.reverse()
        this = {}
        for v, fn in order:
            this[v] = statistics.mean(timed(fn, dev) for _ in range(per_round))
        if r >= args.warm_rounds:
            t_plain.append(this["plain"])
            t_cmd.append(this["cmd"])
            ratios.append(this["cmd"] / this["plain"])
        r += 1
    if not ratios:
        raise RuntimeError("no timed round fitted in the time cap")
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    out = {
        "model": name, "optimizer": label, "weights": n_weights, "embedded_weights": embedded,
        "trainable_after_switch": trainable, "rounds": len(ratios), "warm_rounds_excluded": args.warm_rounds,
        "steps_per_round": per_round, "cut_by_time": len(ratios) < rounds,
        "plain_ms": statistics.median(t_plain) * 1e3, "cmd_ms": statistics.median(t_cmd) * 1e3,
        "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
        "ratios": ratios, "switch_step_s": switch_step,
        "warmup_step_ms_median": statistics.median(warm_cmd[1:-1]) * 1e3 if len(warm_cmd) > 2 else None,
        "loss_after_switch": loss_now,
    }
    log(f"  plain {out['plain_ms']:.1f} ms, CMD {out['cmd_ms']:.1f} ms: ratio {out['ratio_median']:.3f} "
        f"[{q[0]:.3f}-{q[2]:.3f}] over {len(ratios)} rounds; switch step {switch_step:.2f} s")
    return out


def part_steps(args, dev, clock: Clock, cap: float, reserve: float) -> dict:
    configs = [(m, o) for m in ("resnet", "gpt2") for o in ("adamw_fused", "sgd_momentum")]
    out = {"configs": {}}
    part_end = clock.deadline(cap, reserve)
    for i, (m, o) in enumerate(configs):
        key = f"{m}/{o}"
        left = part_end - time.perf_counter()
        if left < 5:
            out["configs"][key] = {"error": "skipped: out of time"}
            continue
        share = left / (len(configs) - i)
        # the setup (model, warm-up, switch) is not interruptible: the rounds get what is left of the share
        deadline = time.perf_counter() + share
        try:
            out["configs"][key] = one_step_config(args, dev, m, o, deadline, part_end + 20)
        except Exception as e:  # noqa: BLE001
            out["configs"][key] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            log(f"  {key} FAILED: {type(e).__name__}: {str(e)[:300]}")
        free(dev)
    return out


# ------------------------------------------------------------------------------- c. memory
class Peak:
    """Peak memory of a phase: torch.cuda.max_memory_allocated, or the peak RSS on CPU."""

    def __init__(self, dev):
        self.dev = dev

    def reset(self) -> None:
        sync(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            reset_peak_rss()

    def now(self) -> float:
        """MiB allocated now (cuda) or resident (cpu)."""
        sync(self.dev)
        return torch.cuda.memory_allocated(self.dev) / 2**20 if self.dev.type == "cuda" else rss_mib()

    def peak(self) -> float:
        sync(self.dev)
        return torch.cuda.max_memory_allocated(self.dev) / 2**20 if self.dev.type == "cuda" else peak_rss_mib()


def part_memory(args, dev, steps: int = 3) -> dict:
    meter = Peak(dev)
    free(dev)
    base = meter.now()
    out = {"measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS (CPU stand-in)",
           "baseline_mib": base}
    # plain AdamW (fused)
    meter.reset()
    name, model, loss_fn = make_gpt2(args, dev)
    out["model"] = name
    opt = OPTIMIZERS["adamw_fused"][1](model.parameters())
    run = stepper(model, opt, loss_fn, dev)
    for _ in range(steps):
        run()
    out["plain_adamw_peak_mib"] = meter.peak()
    log(f"  plain AdamW peak {out['plain_adamw_peak_mib']:.0f} MiB")
    del model, opt, run
    free(dev)
    try:
        return _memory_cmd(args, dev, meter, out, base, steps)
    except Exception as e:  # noqa: BLE001 - keep the plain figure
        out["cmd_error"] = f"{type(e).__name__}: {e}"[:2000]
        out["cmd_traceback"] = traceback.format_exc()[-3000:]
        log(f"  CMD phases FAILED: {out['cmd_error'][:300]}")
        free(dev)
        return out


def _memory_cmd(args, dev, meter, out, base, steps) -> dict:
    """CMD: warm-up, switch, embedded (fills ``out``)."""
    meter.reset()
    _, model, loss_fn = make_gpt2(args, dev)
    opt = modeopt.CMDOptimizer(model, OPTIMIZERS["adamw_fused"][1](model.parameters()), **CMD_KW)
    run = stepper(model, opt, loss_fn, dev)
    for _ in range(CMD_KW["warmup_steps"] - 1):
        run()
    out["cmd_warmup_peak_mib"] = meter.peak()
    out["recording_bytes_host"] = opt.recording_bytes
    meter.reset()
    t = time.perf_counter()
    run()
    sync(dev)
    out["switch_step_s"] = time.perf_counter() - t
    assert opt.phase == "embedded", opt.phase
    out["cmd_switch_peak_mib"] = meter.peak()
    meter.reset()
    for _ in range(steps):
        run()
    out["cmd_embedded_peak_mib"] = meter.peak()
    s = opt.space
    n_emb = sum(x.numel() for x in s.a)
    ms_bytes = s.storage_bytes()["total"]  # a, labels and (int8 encoding) the scales, from the tensors
    out.update({
        "embedded_weights": n_emb, "mode_space_bytes": ms_bytes, "bytes_per_embedded_weight": ms_bytes / n_emb,
        "a_dtype": str(s.a[0].dtype), "labels_dtype": str(s.labels[0].dtype),
        "a_device": str(s.a[0].device), "labels_device": str(s.labels[0].device),
        "embedded_over_plain": out["cmd_embedded_peak_mib"] / out["plain_adamw_peak_mib"],
        "embedded_over_plain_above_baseline": (out["cmd_embedded_peak_mib"] - base)
        / max(out["plain_adamw_peak_mib"] - base, 1e-9),
    })
    log(f"  CMD warm-up {out['cmd_warmup_peak_mib']:.0f} MiB, switch {out['cmd_switch_peak_mib']:.0f} MiB, "
        f"embedded {out['cmd_embedded_peak_mib']:.0f} MiB ({out['embedded_over_plain']:.2f}x plain); "
        f"mode space {out['bytes_per_embedded_weight']:.2f} B/weight ({out['a_dtype']}, {out['labels_dtype']})")
    del model, opt, run, s
    free(dev)
    return out


# ------------------------------------------------------------------------------- d. switch
def planted(n: int, t: int, m: int, dev) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(0)
    prof = torch.randn(m, t, generator=g, device=dev)
    w = torch.empty(n, t, device=dev)
    chunk = 1 << 22
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        lab = torch.randint(0, m, (k,), generator=g, device=dev)
        a = torch.randn(k, 1, generator=g, device=dev)
        b = torch.randn(k, 1, generator=g, device=dev)
        w[i : i + k] = prof[lab] * a + b + 1e-3 * torch.randn(k, t, generator=g, device=dev)
    return w


def _seconds(d: dict) -> float:
    for k in ("switch_s", "seconds", "time_s", "total_s", "s"):
        if isinstance(d.get(k), (int, float)):
            return float(d[k])
    raise KeyError(f"measure_switch returned no time under a known key: {sorted(d)}")


def part_half(args, dev, clock: Clock, cap: float, reserve: float) -> dict:
    """h. bf16 mode space, formed vs in-place vs plain: step-time ratios and step memory per model."""
    import half_precision_step_time as hp

    deadline = clock.deadline(cap, reserve)
    models = ["resnet18"] if args.smoke else ["resnet18", "minilm"]
    batch = {"resnet18": 8 if args.smoke else 64, "minilm": 4 if args.smoke else 32}
    out: dict = {"models": {}}
    for i, name in enumerate(models):
        end = time.perf_counter() + (deadline - time.perf_counter()) / (len(models) - i)
        runs = {v: hp.prepared(v, name, dev, batch[name], 4, 10) for v in hp.VARIANTS}
        for run in runs.values():
            run()
        times = {v: [] for v in hp.VARIANTS}
        ratios: list[float] = []
        rnd = 0
        while rnd < 2 or (time.perf_counter() < end - 10 and rnd < args.rounds):
            order = hp.VARIANTS[rnd % 3:] + hp.VARIANTS[:rnd % 3]
            this = {v: timed(runs[v], dev) for v in order}
            for v in hp.VARIANTS:
                times[v].append(this[v])
            ratios.append(this["formed"] / this["in_place"])
            rnd += 1
        del runs
        free(dev)
        row = {"rounds": rnd, "batch": batch[name], "median_ms": {v: statistics.median(t) * 1e3 for v, t in times.items()},
               "formed_over_in_place": statistics.median(ratios)}
        if dev.type == "cuda" and time.perf_counter() < end:
            row["step_peak_above_mib"] = {}
            for v in hp.MEMORY_VARIANTS:
                row["step_peak_above_mib"][v] = hp.memory_cuda(v, name, batch[name], 4, 10, dev)["step_peak_above_mib"]
                free(dev)
        out["models"][name] = row
        log(f"half {name}: {row}")
    return out


def part_switch(args, dev, clock: Clock, cap: float, reserve: float) -> dict:
    end = clock.deadline(cap, reserve)
    t_snap, m = 20, 10
    try:
        from switch_time import measure_switch  # a colleague's benchmarks/switch_time.py

        how = "benchmarks/switch_time.py measure_switch"

        def measure(n):
            d = measure_switch(n, t_snap, m, str(dev))
            return _seconds(d), d
    except ImportError as e:
        how = f"modeopt.decompose of a planted (N, {t_snap}) trajectory on {dev} (switch_time.py absent: {e})"

        def measure(n):
            w = planted(n, t_snap, m, dev)
            sync(dev)
            t = time.perf_counter()
            d = modeopt.decompose(w, n_modes=m, seed=0, progress=False)
            sync(dev)
            dt = time.perf_counter() - t
            info = {"N": n, "T": t_snap, "M": m, "seconds": dt, "modes_found": int(d.n_modes),
                    "labels_device": str(d.labels.device)}
            del w, d
            free(dev)
            return dt, info

    sizes = [args.switch_small, args.switch_n]
    rows = []
    for n in sizes:
        if rows:
            predicted = rows[-1]["seconds"] * n / rows[-1]["N"] * 2.0  # generation + decompose, generously
            if time.perf_counter() + predicted > end:
                log(f"  N = {n:,} skipped: ~{predicted:.0f} s predicted, {end - time.perf_counter():.0f} s left")
                break
        log(f"  switch, N = {n:,}, T = {t_snap}: {how}")
        s, info = measure(n)
        rows.append({"N": n, "seconds": s, "detail": info})
        log(f"  N = {n:,}: {s:.2f} s")
    best = rows[-1]
    per_100m = best["seconds"] * 100e6 / best["N"]
    return {"how": how, "rows": rows, "T": t_snap, "M": m, "s_per_100M": per_100m,
            "extrapolated": best["N"] < 100_000_000, "from_N": best["N"]}


# ------------------------------------------------------------------------------- e. targets
def targets(results: dict) -> list[dict]:
    rows = []

    def add(what, value, target, fmt, source):
        ok = None if value is None else value <= target
        rows.append({"target": what, "value": value, "limit": target, "ok": ok, "fmt": fmt, "source": source})

    cfgs = results.get("steps", {}).get("configs", {})
    for key, c in cfgs.items():
        m, o = key.split("/")
        limit = TARGETS["step_adamw_fused" if o == "adamw_fused" else "step_sgd_momentum"]
        add(f"embedded / plain step, {OPTIMIZERS[o][0]}, {m}", c.get("ratio_median"), limit, "{:.3f}x",
            c.get("error") or c.get("model", ""))
    mem = results.get("memory", {})
    add("mode space bytes per embedded weight", mem.get("bytes_per_embedded_weight"),
        TARGETS["mode_space_bytes_per_weight"], "{:.2f} B",
        mem.get("error") or mem.get("cmd_error") or mem.get("model", ""))
    add("embedded-phase peak / plain AdamW peak (GPT-2, batch 8)", mem.get("embedded_over_plain"),
        TARGETS["embedded_peak_over_plain_adamw"], "{:.2f}x",
        mem.get("error") or mem.get("cmd_error") or mem.get("measure", ""))
    sw = results.get("switch", {})
    add("switch, s per 100 M weights (T = 20)", sw.get("s_per_100M"), TARGETS["switch_s_per_100M"], "{:.2f} s",
        sw.get("error") or (f"from N = {sw['from_N']:,}" + (" (extrapolated)" if sw.get("extrapolated") else ""))
        if "from_N" in sw else sw.get("error", ""))
    return rows


def markdown(results: dict, args) -> str:
    h = results["header"]
    lines = [
        f"# GPU check{' (smoke rehearsal: tiny models - not a GPU measurement)' if args.smoke else ''}",
        "",
        f"Device: **{h['device_name']}** ({h['device']}); torch {h['torch']}, triton {h['triton']}, "
        f"transformers {h['transformers']}, torchvision {h['torchvision']}; {h['date']}; total {h['total_seconds']:.0f} s.",
        f"CMD: {', '.join(f'{k}={v}' for k, v in CMD_KW.items() if k not in ('exclude', 'progress'))}, "
        "exclude=lambda n, p: p.ndim < 2.",
        f"Machine: {h['machine_line']}.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | verdict | note |",
        "|---|---|---|---|---|",
    ]
    for r in results["targets"]:
        val = "-" if r["value"] is None else r["fmt"].format(r["value"])
        verdict = "not measured" if r["ok"] is None else ("met" if r["ok"] else "**missed**")
        lim = r["fmt"].format(r["limit"])
        lines.append(f"| {r['target']} | {val} | <= {lim} | {verdict} | {str(r['source'])[:120]} |")
    t = results.get("tests")
    lines += ["", "## Tests", ""]
    if t is None:
        lines.append("not run (--parts)")
    elif "error" in t:
        lines.append(f"Failed to run: {t['error']}")
    else:
        lines.append(f"`{t['command']}`: {t['counts']}, return code {t['returncode']}, {t['seconds']} s"
                     + (" (timed out)" if t["timed_out"] else "") + (f"; missing: {t['missing_files']}"
                                                                       if t["missing_files"] else ""))
        lines += ["", "| test | outcome | detail |", "|---|---|---|"]
        for k, v in t["outcomes"].items():
            lines.append(f"| {k} | {v['outcome']} | {v['detail'][:150]} |")
    lines += ["", "## Step time (median over interleaved rounds)", "",
              "| model | optimizer | plain (ms) | CMD (ms) | ratio [IQR] | rounds | switch step (s) |",
              "|---|---|---|---|---|---|---|"]
    for key, c in results.get("steps", {}).get("configs", {}).items():
        if "error" in c:
            lines.append(f"| {key} | | | | error: {c['error'][:150]} | | |")
        else:
            lines.append(f"| {c['model']} | {c['optimizer']} | {c['plain_ms']:.1f} | {c['cmd_ms']:.1f} | "
                         f"{c['ratio_median']:.3f} [{c['ratio_q1']:.3f}-{c['ratio_q3']:.3f}] | {c['rounds']}"
                         f"{' (cut by time)' if c['cut_by_time'] else ''} | {c['switch_step_s']:.2f} |")
    mem = results.get("memory")
    lines += ["", "## Memory", ""]
    if mem is None:
        lines.append("not run (--parts)")
    elif "error" in mem:
        lines.append(f"error: {mem['error'][:300]}")
    else:
        lines += [f"{mem['model']}; {mem['measure']}; baseline {mem['baseline_mib']:.0f} MiB.", "",
                  "| phase | peak (MiB) |", "|---|---|"]
        for k in ("plain_adamw", "cmd_warmup", "cmd_switch", "cmd_embedded"):
            if k + "_peak_mib" in mem:
                lines.append(f"| {k.replace('_', ' ')} | {mem[k + '_peak_mib']:.0f} |")
    if mem is not None and "cmd_error" in mem:
        lines += ["", f"CMD phases failed: {mem['cmd_error'][:300]}"]
    elif mem is not None and "error" not in mem:
        lines += ["", f"Mode space: {mem['mode_space_bytes'] / 2**20:.1f} MiB for {mem['embedded_weights']:,} embedded "
                  f"weights = {mem['bytes_per_embedded_weight']:.2f} B/weight (a {mem['a_dtype']} on {mem['a_device']}, "
                  f"labels {mem['labels_dtype']} on {mem['labels_device']}); warm-up recording "
                  f"{mem['recording_bytes_host'] / 2**20:.0f} MiB."]
    sw = results.get("switch")
    lines += ["", "## Switch", ""]
    if sw is None:
        lines.append("not run (--parts)")
    elif "error" in sw:
        lines.append(f"error: {sw['error'][:300]}")
    else:
        lines.append(f"{sw['how']}: " + "; ".join(f"N = {r['N']:,}: {r['seconds']:.2f} s" for r in sw["rows"])
                     + f" -> {sw['s_per_100M']:.2f} s per 100 M weights"
                     + (" (extrapolated linearly)" if sw["extrapolated"] else ""))
    hh = results.get("half")
    lines += ["", "## Exact half precision (bf16 weights: formed from the frozen base vs the in-place update)", ""]
    if hh is None:
        lines.append("not run (--parts)")
    elif "error" in hh:
        lines.append(f"error: {hh['error'][:300]}")
    else:
        lines += ["| model | plain ms | in-place ms | formed ms | formed / in-place | step peak MiB (plain / in-place / "
                  "formed / formed, kept) |", "|---|---|---|---|---|---|"]
        for name, r in hh["models"].items():
            t, mem = r["median_ms"], r.get("step_peak_above_mib")
            mem_s = " / ".join(f"{mem[v]:.0f}" for v in ("plain", "in_place", "formed", "formed_kept")) if mem else "-"
            lines.append(f"| {name} (batch {r['batch']}, {r['rounds']} rounds) | {t['plain']:.1f} | {t['in_place']:.1f} "
                         f"| {t['formed']:.1f} | {r['formed_over_in_place']:.3f}x | {mem_s} |")
    errors = [k for k in ("tests", "steps", "memory", "switch", "half") if "error" in results.get(k, {})]
    if errors:
        lines += ["", f"Parts that failed: {errors} (tracebacks in the JSON)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models and caps (CPU rehearsal, ~2 minutes)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 540; smoke 200)")
    ap.add_argument("--parts", nargs="+", default=["tests", "steps", "memory", "switch", "half"],
                    choices=["tests", "steps", "memory", "switch", "half"])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default 30; smoke 6)")
    ap.add_argument("--warm-rounds", type=int, default=None, help="rounds excluded (default 3; smoke 1)")
    ap.add_argument("--min-rounds", type=int, default=None, help="rounds timed even past the cap (default 5; smoke 2)")
    ap.add_argument("--steps-per-round", type=int, default=None, help="steps per variant per round (default 2; smoke 1)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="ResNet in channels_last (default: on for cuda, off on cpu)")
    ap.add_argument("--gpt2-batch", type=int, default=8)
    ap.add_argument("--coef-dtype", choices=["float32", "bfloat16", "int8"], default="float32",
                    help="storage of a in mode space (the library's default is float32)")
    ap.add_argument("--switch-n", type=int, default=None, help="weights for the switch time (default 100e6; smoke 1e6)")
    ap.add_argument("--switch-small", type=int, default=None, help="first, small N of the switch (default 10e6)")
    ap.add_argument("--out", default=None, help="result name (default gpu, or gpu_smoke)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: use --smoke --device cpu to rehearse")
    s = args.smoke
    args.budget = args.budget or (200.0 if s else 540.0)
    args.rounds = args.rounds or (6 if s else 30)
    args.warm_rounds = args.warm_rounds if args.warm_rounds is not None else (1 if s else 3)
    args.steps_per_round = args.steps_per_round or (1 if s else 2)
    args.min_rounds = args.min_rounds or (2 if s else 5)
    args.channels_last = (dev.type == "cuda") if args.channels_last is None else args.channels_last
    args.switch_n = args.switch_n or (1_000_000 if s else 100_000_000)
    args.switch_small = args.switch_small or (200_000 if s else 10_000_000)
    name = args.out or ("gpu_smoke" if s else "gpu")
    CMD_KW["coef_dtype"] = getattr(torch, args.coef_dtype)
    caps = {"tests": 60 if s else 150, "steps": 60 if s else 170, "memory": 20 if s else 50, "switch": 15 if s else 60,
            "half": 40 if s else 90}
    if dev.type == "cpu":
        torch.set_num_threads(1)  # the rehearsal box is 2 shared cores: two threads only fight
    clock = Clock(args.budget)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    import torchvision
    import transformers

    header = {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "torch": torch.__version__, "triton": triton_version, "torchvision": torchvision.__version__,
        "transformers": transformers.__version__, "cuda_runtime": torch.version.cuda,
        "coef_dtype": args.coef_dtype, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "modeopt_fused_cpu_kernels": modeopt.modespace.kernels.fused_available(), "smoke": s, "argv": sys.argv[1:], "machine": machine(),
    }
    header["machine_line"] = machine_line(header["machine"])
    log(f"GPU check on {header['device_name']} ({dev}); torch {torch.__version__}, triton {triton_version}; "
        f"budget {args.budget:.0f} s")
    results: dict = {"header": header, "targets_spec": TARGETS}
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    parts = [p for p in ["tests", "steps", "memory", "switch", "half"] if p in args.parts]
    reserve = lambda after: sum(caps[p] for p in parts[parts.index(after) + 1:]) * 0.5  # noqa: E731

    for p in parts:
        left = clock.left()
        if left < 5:
            results[p] = {"error": "skipped: the run's time budget is spent"}
            continue
        if p == "tests":
            run_part(results, p, part_tests, args, min(caps[p], max(10.0, left - reserve(p))))
        elif p == "steps":
            run_part(results, p, part_steps, args, dev, clock, caps[p], reserve(p))
        elif p == "memory":
            run_part(results, p, part_memory, args, dev)
        elif p == "switch":
            run_part(results, p, part_switch, args, dev, clock, caps[p], reserve(p))
        elif p == "half":
            run_part(results, p, part_half, args, dev, clock, caps[p], reserve(p))
        free(dev)

    header["total_seconds"] = time.perf_counter() - T0
    results["targets"] = targets(results)
    md = markdown(results, args)
    print("\n" + md, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(md + "\n")
    log(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")


if __name__ == "__main__":
    main()
