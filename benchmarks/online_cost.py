"""What online CMD and gradual embedding cost and save, on ResNet18 (batch 64, 32x32, SGD + momentum).

1. The running-moment update of OnlineCMD: time of one sample (a pass over the 11.2 M weights)
   against a training step, and its amortised share at sample_every = 1, 10, 62 (once per epoch of
   the MNIST subset, the paper's schedule).
2. Gradual embedding with whole-tensor freezing: step time and memory (weight gradients, optimizer
   state, running moments, frozen coefficients) at frozen fractions 0 ... 0.9. Tensors are frozen
   largest-first by `OnlineCMDOptimizer.freeze(..., allow_references=True)` to reach each fraction;
   the configurations are timed in interleaved rounds.

    python benchmarks/online_cost.py

Results: benchmarks/results/online_cost.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.models import resnet18

import modeopt

from _common import machine, machine_line, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    proto = resnet18(num_classes=10)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    configs = []
    for frac in args.fractions:
        model = copy.deepcopy(proto)
        opt = modeopt.OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                         n_modes=10, fit_at=6, snapshot_every=2, sample_every=10**9, seed=0)
        for _ in range(7):
            step(model, opt)
        assert opt.online.phase == "fitted"
        if frac > 0:
            names = sorted(opt.online.names, key=lambda n: -dict(model.named_parameters()).get(n, torch.empty(0)).numel())
            chosen = []
            for n in names:
                if opt.frozen_fraction() >= frac:
                    break
                if n in dict(model.named_parameters()):
                    opt.freeze([n], allow_references=True)
                    chosen.append(n)
        step(model, opt)  # allocate
        configs.append({"fraction": opt.frozen_fraction(), "model": model, "opt": opt, "times": []})

    # 1. one running-moment sample vs. a step (config 0: nothing frozen)
    base_opt, base_model = configs[0]["opt"], configs[0]["model"]
    sample_times = []
    for _ in range(5):
        t = time.perf_counter()
        base_opt.online.add_sample()
        sample_times.append(time.perf_counter() - t)

    # 2. interleaved step times
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
        for c in order:
            t = time.perf_counter()
            step(c["model"], c["opt"])
            c["times"].append(time.perf_counter() - t)

    def memory(c) -> dict:
        opt, model = c["opt"], c["model"]
        grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        moments = opt.online.state_bytes
        frozen = sum(sum(v.numel() * v.element_size() for v in f.values() if torch.is_tensor(v)) for f in opt.frozen.values())
        return {"grad_bytes": grads, "optimizer_state_bytes": state, "moment_bytes": moments, "frozen_coef_bytes": frozen}

    step_med = statistics.median(configs[0]["times"])
    sample = statistics.median(sample_times)
    rows = []
    for c in configs:
        med = statistics.median(c["times"])
        rows.append({"frozen_fraction": round(c["fraction"], 3), "step_ms": med * 1e3,
                     "ratio_to_unfrozen": med / step_med, **memory(c)})
    n = sum(p.numel() for p in proto.parameters())
    label_bytes = base_opt.online.labels[0].element_size()
    m = machine()
    lines = [
        f"Online CMD and gradual embedding on resnet18(num_classes=10) ({n:,} weights), batch 64, 32x32, SGD + "
        f"momentum, M = 10. Machine: {machine_line(m)}.",
        "",
        f"**Running-moment update** (one sample: a pass over every weight): {sample * 1e3:.1f} ms, against a "
        f"training step of {step_med * 1e3:.0f} ms: {sample / step_med:.1%} of a step when sampled every step, "
        f"{sample / step_med / 10:.2%} every 10 steps, {sample / step_med / 62:.2%} once per epoch (62 steps). "
        f"Memory after the fit: {rows[0]['moment_bytes'] / n:.1f} bytes per weight (float64 mean and co-moment, "
        f"{label_bytes}-byte mode label), nothing that grows.",
        "",
        f"**Gradual embedding, whole tensors frozen** ({args.rounds} interleaved rounds, median step):",
        "",
        "| frozen fraction | step (ms) | / nothing frozen | weight gradients (MiB) | optimizer state (MiB) "
        "| running moments (MiB) | frozen coefficients (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['frozen_fraction']:.2f} | {r['step_ms']:.0f} | {r['ratio_to_unfrozen']:.2f} | "
                     f"{mib(r['grad_bytes'])} | {mib(r['optimizer_state_bytes'])} | {mib(r['moment_bytes'])} | "
                     f"{mib(r['frozen_coef_bytes'])} |")
    lines += ["", f"A frozen tensor costs {8 + label_bytes} bytes per weight (float32 a and b, the {label_bytes}-byte "
              "mode label it keeps) and one pass per step "
              "to follow its references; it saves its weight gradient (4 B), its optimizer state (4 B for "
              "SGD + momentum, 8 for Adam), its moments (16 B) and the weight-gradient half of its layer's backward."]
    md = "\n".join(lines)
    print(md)
    save("online_cost", {"machine": m, "args": vars(args), "sample_s": sample, "step_s": step_med, "rows": rows}, md)


if __name__ == "__main__":
    main()
