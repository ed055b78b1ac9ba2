"""How far half-precision embedded weights drift from ``a * r + b`` (docs/optimizer.md, "Half-precision weights").

Mode space maintains the weights in place (``w += a * dr`` every step). This trains an MLP whose
weights are cast to bf16 (or kept in float32 for comparison) with AdamW through the switch and
reports, after k embedded steps, the largest deviation of the weights from ``w_switch + a * (r - r_switch)``
relative to the largest intended movement. Writes ``results/half_precision_drift.{json,md}``.

    cd benchmarks && python half_precision_drift.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import RESULTS, machine, machine_line  # noqa: E402

import modeopt  # noqa: E402

CHECKS = (1, 10, 100, 400)


def run(dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).to(dtype)
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), n_modes=4, warmup_steps=20,
                               snapshot_every=2, seed=0, progress=False)
    x, y = torch.randn(64, 32).to(dtype), torch.randint(0, 4, (64,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the half-precision warning at the switch is the subject here
        for _ in range(20):
            step()
    space = opt.space
    w0 = [p.detach().double().reshape(-1).clone() for p in space.params]
    r0 = space.r_full().detach().double().clone()
    rows = []
    for k in range(1, max(CHECKS) + 1):
        step()
        if k in CHECKS:
            dr = space.r_full().detach().double() - r0
            err = move = 0.0
            for p, a, lab, w in zip(space.params, space.a, space.mode_index(), w0):
                intended = a.double() * dr[lab]
                err = max(err, float((p.detach().double().reshape(-1) - (w + intended)).abs().max()))
                move = max(move, float(intended.abs().max()))
            rows.append({"steps": k, "max_deviation": err, "max_intended_movement": move, "ratio": err / move})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    out = {"machine": machine(), "results": {str(dt).replace("torch.", ""): run(dt)
                                             for dt in (torch.float32, torch.bfloat16)}}
    lines = ["# Half-precision embedded weights: drift from a * r + b", "", machine_line(out["machine"]), "",
             "| weights | embedded steps | max deviation | max intended movement | ratio |", "|---|---|---|---|---|"]
    for name, rows in out["results"].items():
        for row in rows:
            lines.append(f"| {name} | {row['steps']} | {row['max_deviation']:.2e} | {row['max_intended_movement']:.2e} "
                         f"| {row['ratio']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "half_precision_drift.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "half_precision_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
