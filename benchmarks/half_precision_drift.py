"""How far half-precision embedded weights drift from ``a * r + b`` (docs/optimizer.md, "Half-precision weights").

Trains an MLP whose weights are cast to bf16 or fp16 (or kept in float32 for comparison) with AdamW
through the switch and reports, after k embedded steps, for the weights *as the model computes with
them* (``model.state_dict()``):

* the largest deviation from ``w_switch + a * (r - r_switch)`` (float64) relative to the largest
  intended movement;
* the largest distance in ulps of the weight's dtype from that exact value rounded once.

Two designs for half-precision weights: ``formed`` (today: the parameter keeps its switch-time
value and each forward forms ``round(w_switch + a * dr)``), and ``in-place`` (before issue 25:
``w += a * dr`` after every step, rounding each step; ``ModeSpace.HALF_FORMED = False``).
Writes ``results/half_precision_drift.{json,md}``.

    python benchmarks/half_precision_drift.py
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
from modeopt.modespace.space import ModeSpace  # noqa: E402

CHECKS = (1, 10, 100, 400, 1000)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Half-precision bits as integers ordered like the values (ulp distances are differences)."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def run(dtype: torch.dtype, formed: bool = True) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).to(dtype)
    # eps 1e-4: AdamW's default 1e-8 underflows when it steps fp16 weights in the warm-up
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4), n_modes=4,
                               warmup_steps=20, snapshot_every=2, seed=0, progress=False)
    x, y = torch.randn(64, 32).to(dtype), torch.randint(0, 4, (64,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()

    ModeSpace.HALF_FORMED = formed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(20):
                step()
    finally:
        ModeSpace.HALF_FORMED = True
    space = opt.space
    w0 = [p.detach().double().reshape(-1).clone() for p in space.params]
    r0 = space.r_full().detach().double().clone()
    rows = []
    for k in range(1, max(CHECKS) + 1):
        step()
        if k in CHECKS:
            dr = space.r_full().detach().double() - r0
            state = model.state_dict()
            err = move = 0.0
            ulps = 0
            for name, a, lab, w in zip(space.names, space.a, space.mode_index(), w0):
                intended = a.double() * dr[lab]
                now = state[name].detach().reshape(-1)
                err = max(err, float((now.double() - (w + intended)).abs().max()))
                move = max(move, float(intended.abs().max()))
                if dtype != torch.float32:
                    exact = (w + intended).to(dtype)
                    ulps = max(ulps, int((_ordered(now) - _ordered(exact)).abs().max()))
            rows.append({"steps": k, "max_deviation": err, "max_intended_movement": move, "ratio": err / move,
                         "max_ulps": ulps if dtype != torch.float32 else None})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    variants = {"float32": (torch.float32, True), "bfloat16 formed (now)": (torch.bfloat16, True),
                "bfloat16 in-place (before)": (torch.bfloat16, False), "float16 formed (now)": (torch.float16, True),
                "float16 in-place (before)": (torch.float16, False)}
    out = {"machine": machine(), "results": {name: run(dt, formed) for name, (dt, formed) in variants.items()}}
    lines = ["# Half-precision embedded weights: drift from a * r + b", "", machine_line(out["machine"]), "",
             "Weights as the model computes with them (`model.state_dict()`); ulps: distance from the exact "
             "`w_switch + a * dr` rounded once to the weight's dtype.", "",
             "| weights | embedded steps | max deviation | max intended movement | ratio | max ulps |",
             "|---|---|---|---|---|---|"]
    for name, rows in out["results"].items():
        for row in rows:
            ulps = "-" if row["max_ulps"] is None else str(row["max_ulps"])
            lines.append(f"| {name} | {row['steps']} | {row['max_deviation']:.2e} | {row['max_intended_movement']:.2e} "
                         f"| {row['ratio']:.4f} | {ulps} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "half_precision_drift.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "half_precision_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
