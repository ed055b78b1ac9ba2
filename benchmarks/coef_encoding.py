"""Bytes per embedded weight, and what the compact encoding costs in accuracy (issue 25, part 2).

    python benchmarks/coef_encoding.py                 # 5 seeds of the MNIST demo, bytes table, kernel times
    python benchmarks/coef_encoding.py --seeds 0 1     # fewer seeds
    python benchmarks/coef_encoding.py --quick         # 1 seed, 2 epochs: a smoke run

Three storages of ``a`` and the labels, ``CMDOptimizer(coef_dtype=...)``:

* ``float32``: 4 B of ``a`` + 1 B label;
* ``bfloat16``: 2 B + 1 B (BlockwiseCMD's default);
* ``int8``: 8-bit codes with a float32 scale per (tensor, mode) + labels packed 4 bits per weight
  for M <= 16 (modeopt/modespace/kernels/encoding.py).

**Accuracy** - the MNIST demo's CMD run (examples/demo.py: SmallCNN on 4,000 real MNIST digits, Adam
lr 1e-3, batch 64, 6 epochs, the switch to M = 10 modes after 3 epochs, snapshot every 5 steps, biases
free). The warm-up is the same for every storage (same seed, same batches), so it runs once per seed:
its state at the step before the switch is saved and each storage resumes from it and trains to the
end. Final test accuracy per seed and storage, and the relative error each storage puts on ``a``
(``||a - a_stored|| / ||a||`` against the float32 ``a`` of the same switch).

**Bytes** - measured from the tensors a mode space holds (``ModeSpace.storage_bytes``: ``numel *
element_size`` of ``a``, labels and scales), for the SmallCNN space above and for a MiniLM-L6-shaped
space (its word embeddings and 36 weight matrices, 22.3 M weights, random labels and ``a``: the storage does not depend
on their values).

**Kernel time** - one ``mode_update`` and one ``mode_reduce`` over the MiniLM-shaped space on the CPU
(fused C kernels, 1 thread), median of 7.

Results: ``benchmarks/results/coef_encoding.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "workloads")]

import modeopt  # noqa: E402
from modeopt.modespace import kernels  # noqa: E402
from modeopt.modespace.space import ModeSpace  # noqa: E402
from workloads import SmallCNN, batches, evaluate, mnist_subset  # noqa: E402

from _common import machine, machine_line, save  # noqa: E402

STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def _opt(model, args, seed, coef_dtype):
    return modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), n_modes=args.modes,
                                warmup_steps=args.warmup, snapshot_every=5, seed=seed, coef_dtype=coef_dtype,
                                exclude=lambda name, p: p.ndim < 2)


def _train(model, opt, data, steps):
    for _ in range(steps):
        xb, yb = next(data)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def run_seed(seed: int, args, xtr, ytr, xte, yte) -> dict:
    """The warm-up once, then each storage from the step before the switch to the end."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = _opt(model, args, seed, torch.float32)
    data = batches(xtr, ytr, 64, seed=seed)
    _train(model, opt, data, args.warmup - 1)
    assert opt.phase == "warmup"
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    out = {"seed": seed, "acc_at_switch": evaluate(model, xte, yte), "final": {}, "bytes": {}}
    a32 = None
    for name, dt in STORAGES.items():
        m = SmallCNN()
        m.load_state_dict(saved_model)
        o = _opt(m, args, seed, dt)
        o.load_state_dict(copy.deepcopy(saved_opt))
        d = batches(xtr, ytr, 64, seed=seed)
        for _ in range(args.warmup - 1):  # the same batches as the warm-up run consumed
            next(d)
        before = [v.detach().clone() for v in m.state_dict().values()]  # the weights (r is not in state_dict)
        _train(m, o, d, 1)  # the switch
        assert o.phase == "embedded"
        if name == "float32":
            a32 = o.space.coefficients()
        stored = o.space.coefficients()
        err = (sum(float((x - y).double().pow(2).sum()) for x, y in zip(a32, stored))
               / sum(float(x.double().pow(2).sum()) for x in a32)) ** 0.5
        out.setdefault("a_rel_error", {})[name] = err
        out["bytes"][name] = o.space.storage_bytes()
        moved = max(float((p - q).abs().max()) for p, q in zip(m.state_dict().values(), before))
        out.setdefault("switch_step_max_change", {})[name] = moved
        _train(m, o, d, args.steps - args.warmup)
        out["final"][name] = evaluate(m, xte, yte)
        with torch.no_grad():
            out.setdefault("test_loss", {})[name] = float(F.cross_entropy(m(xte), yte))
        w_end = torch.cat([v.detach().reshape(-1).float() for v in m.state_dict().values()])
        if name == "float32":
            w32, moved32 = w_end, w_end - torch.cat([v.reshape(-1).float() for v in before])
        # how far the run ended from the float32 run, relative to how far that one moved after the switch
        out.setdefault("end_vs_float32", {})[name] = float((w_end - w32).norm() / moved32.norm())
        print(f"seed {seed} {name}: final {out['final'][name]:.4f}, test loss {out['test_loss'][name]:.4f}, "
              f"|a - a_stored| / |a| = {err:.2e}, end vs float32 {out['end_vs_float32'][name]:.2e}", flush=True)
    return out


MINILM_SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]  # one encoder layer's weight matrices


def minilm_space(coef_dtype: torch.dtype, n_modes: int = 10) -> tuple[ModeSpace, list[torch.Tensor]]:
    """A mode space over a MiniLM-L6-shaped set of weight matrices (6 layers) plus its word embeddings."""
    g = torch.Generator().manual_seed(0)
    shapes = [(30522, 384)] + MINILM_SHAPES * 6
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes])
    params = [(str(j), p) for j, p in enumerate(model)]
    labels = [torch.randint(0, n_modes, (p.numel(),), generator=g) for _, p in params]
    a = [torch.randn(p.numel(), generator=g) for _, p in params]
    space = ModeSpace(model, params, labels, a, torch.zeros(n_modes, dtype=torch.int64), torch.zeros(n_modes),
                      coef_dtype=coef_dtype)
    return space, [p for _, p in params]


def kernel_times(reps: int = 7) -> dict:
    out = {}
    for name, dt in STORAGES.items():
        space, ws = minilm_space(dt)
        scales = space.a_scale
        delta = torch.randn(space.n_modes) * 1e-3
        grads = [torch.randn_like(w) for w in ws]
        tu, tr = [], []
        for _ in range(reps):
            t = time.perf_counter()
            kernels.update(ws, space.a, space.labels, delta, scales=scales)
            tu.append(time.perf_counter() - t)
            t = time.perf_counter()
            kernels.reduce(grads, space.a, space.labels, space.n_modes, scales)
            tr.append(time.perf_counter() - t)
        out[name] = {"update_ms": 1e3 * statistics.median(tu), "reduce_ms": 1e3 * statistics.median(tr),
                     "weights": space.storage_bytes()["weights"], "bytes": space.storage_bytes()}
        space.remove()
    return out


def _stats(xs):
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=int, default=3)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel timing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.warmup_epochs = args.seeds[:1], 2, 1
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = mnist_subset()
    spe = len(xtr) // 64
    args.steps, args.warmup = args.epochs * spe, args.warmup_epochs * spe
    t0 = time.time()
    runs = [run_seed(s, args, xtr, ytr, xte, yte) for s in args.seeds]
    acc = {k: _stats([r["final"][k] for r in runs]) for k in STORAGES}
    err = {k: _stats([r["a_rel_error"][k] for r in runs]) for k in STORAGES}
    loss = {k: _stats([r["test_loss"][k] for r in runs]) for k in STORAGES}
    dev = {k: _stats([r["end_vs_float32"][k] for r in runs]) for k in STORAGES}
    kt = {} if args.no_kernels or args.quick else kernel_times()
    payload = {"machine": machine(), "seeds": args.seeds, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
               "modes": args.modes, "runs": runs, "accuracy": acc, "a_rel_error": err, "test_loss": loss,
               "end_vs_float32": dev, "minilm_shaped": kt,
               "wall_s": time.time() - t0}
    lines = [
        f"MNIST demo setting (SmallCNN, 4,000 digits, Adam 1e-3, {args.epochs} epochs, switch to M = {args.modes} "
        f"after {args.warmup_epochs}), seeds {args.seeds}: one warm-up per seed, each storage from the switch on.",
        f"Machine: {machine_line(payload['machine'])}; shared with other jobs (load varied).",
        "",
        "| storage of a + labels | final test accuracy, mean +- std | min .. max | per seed | test loss, mean +- std "
        "| rel. error on a (mean) | end weights vs float32 run (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in STORAGES:
        s = acc[k]
        lines.append(f"| {k} | {s['mean']:.4f} +- {s['std']:.4f} | {s['min']:.4f} .. {s['max']:.4f} | "
                     + ", ".join(f"{r['final'][k]:.4f}" for r in runs)
                     + f" | {loss[k]['mean']:.4f} +- {loss[k]['std']:.4f} | {err[k]['mean']:.2e} | {dev[k]['mean']:.2e} |")
    lines += ["", "rel. error on a: ||a - a_stored|| / ||a|| at the switch, against the float32 a of the same switch. "
              "End weights vs float32 run: ||w_end - w_end(float32)|| / ||w_end(float32) - w_before_switch||."]
    lines += ["", "Bytes per embedded weight, measured from the stored tensors (numel x element size):", "",
              "| space | storage | weights | a | labels | scales | a + labels | total |", "|---|---|---|---|---|---|---|---|"]

    def row(space, k, b):
        return (f"| {space} | {k} | {b['weights']:,} | {b['a_per_weight']:.3f} | {b['labels_per_weight']:.3f} | "
                f"{b['scales_per_weight']:.5f} | {b['a_per_weight'] + b['labels_per_weight']:.3f} | "
                f"{b['total_per_weight']:.4f} |")

    for k in STORAGES:
        lines.append(row("SmallCNN (demo)", k, runs[0]["bytes"][k]))
    for k, v in kt.items():
        lines.append(row("MiniLM-L6-shaped", k, v["bytes"]))
    if kt:
        lines += ["", "One pass over the MiniLM-shaped space on the CPU (fused C kernels, 1 thread, median of 7; "
                  "a loaded shared machine):", "", "| storage | mode_update (ms) | mode_reduce (ms) |", "|---|---|---|"]
        lines += [f"| {k} | {v['update_ms']:.1f} | {v['reduce_ms']:.1f} |" for k, v in kt.items()]
    md = "\n".join(lines)
    print("\n" + md)
    save("coef_encoding" if not args.quick else "coef_encoding_quick", payload, md, args.out)


if __name__ == "__main__":
    main()
