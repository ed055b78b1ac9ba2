"""Grokking: Koopman spectra and CMD modes of a transformer that groks and of ones that do not.

Reproduces, CPU-sized, the grokking study of Redman et al., "Identifying Equivalent Training
Dynamics" (arXiv 2302.09160, NeurIPS 2024), with modeopt's public API (docs/koopman.md, section
"Study: grokking", says where this set-up differs from the paper's and why).

A one-layer transformer (Nanda et al. 2023: no LayerNorm, ReLU MLP, 4 heads, untied embed /
unembed; here d_model 64, d_mlp 256) learns ``(a + b) mod 97`` from 30 % of the pairs, full
batch, float32, AdamW (betas 0.9, 0.98). Three configurations:

* ``grok``        - weight decay 2.0, lr 3e-3: memorises in ~130 steps; in the full run seed 0 generalised
  at step 740, seed 1 not by step 2,000;
* ``no-wd``       - weight decay 0, lr 3e-3: memorises, does not generalise within the run;
* ``constrained`` - weight decay 0, the weight norm held at 0.8 x its initial value after every
  step (Liu et al. 2023, "Omnigrok"): the paper's non-grokking control (first ``--early`` steps and
  a little beyond only).

The weights (all 62,144) are recorded at every step for the first ``--early`` steps (the paper's
window: 100 steps) and every ``--every`` steps over the whole run. Then:

1. accuracies of every run; memorisation and grokking steps;
2. ``compare_dynamics`` on the first ``--early`` steps (the paper's comparison; observable: the
   MLP output matrix ``W_out`` in 10 principal coordinates, 32 delays, 10 eigenvalues, as the
   paper), for seed-vs-seed pairs of one configuration and for pairs across configurations;
3. ``compare_dynamics`` on the whole runs (10 principal coordinates of all weights);
4. within each grokking run: equal windows just before and just after the grokking step;
5. ``modeopt.decompose`` (M = ``--modes``) of every whole run: reconstruction error, test accuracy
   of the reconstructed model along the run, which tensors fall in which mode, the Fourier content
   of each mode's token-embedding weights, and the reference profiles around the grokking step.

Writes ``OUT/grokking.{json,md}`` and ``OUT/*.png``; ``--images`` copies the figures the docs show
to ``docs/images/studies/``. Measured on this project's machine (2 shared vCPUs, one torch thread,
other jobs running, load ~3.7): the full setting took 552 s, 9.2 minutes, of which 504 s training
(``--quick``: 15-20 s).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeopt
from modeopt.analysis import Recording, compare_dynamics
from workloads import cpu_name

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    p: int = 97
    frac: float = 0.3
    d_model: int = 64
    d_mlp: int = 256
    heads: int = 4
    lr: float = 3e-3
    wd: float = 2.0
    alpha: float = 0.8           # constrained run: norm held at alpha x initial norm
    steps: int = 2000            # grok and no-wd runs
    constrained_steps: int = 300
    early: int = 100             # every step recorded for the first `early` steps
    every: int = 5               # whole-run recording period
    eval_every: int = 10
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    modes: int = 8
    early_delays: int = 32
    early_rank: int = 10
    early_window: int = 50
    delays: int = 32
    window_delays: int = 8
    n_null: int = 200


QUICK = dict(p=31, d_model=32, d_mlp=64, steps=150, constrained_steps=60, early=50, every=2, eval_every=5,
             seeds=[0, 1], modes=5, early_delays=8, early_rank=6, early_window=24, delays=8, window_delays=4,
             n_null=50, lr=1e-2, frac=0.5)

CONFIGS = {"grok": "weight decay {wd:g}", "no-wd": "no weight decay", "constrained": "norm held at {alpha:g} x init"}


# ----------------------------------------------------------------------------------- model, data
class Transformer(nn.Module):
    """Nanda et al.'s one-layer transformer without LayerNorm; only the last position is computed."""

    def __init__(self, p: int, d: int, d_mlp: int, heads: int):
        super().__init__()
        dh = d // heads
        self.dh = dh
        self.W_E = nn.Parameter(torch.randn(p + 1, d) / math.sqrt(d))      # token p is "="
        self.W_pos = nn.Parameter(torch.randn(3, d) / math.sqrt(d))
        self.W_Q = nn.Parameter(torch.randn(heads, d, dh) / math.sqrt(d))
        self.W_K = nn.Parameter(torch.randn(heads, d, dh) / math.sqrt(d))
        self.W_V = nn.Parameter(torch.randn(heads, d, dh) / math.sqrt(d))
        self.W_O = nn.Parameter(torch.randn(heads * dh, d) / math.sqrt(d))
        self.W_in = nn.Parameter(torch.randn(d, d_mlp) / math.sqrt(d))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_mlp, d) / math.sqrt(d))
        self.b_out = nn.Parameter(torch.zeros(d))
        self.W_U = nn.Parameter(torch.randn(d, p) / math.sqrt(p))

    def forward(self, x):
        r = self.W_E[x] + self.W_pos                                       # (B, 3, d)
        q = torch.einsum("bd,hde->bhe", r[:, -1], self.W_Q)
        k = torch.einsum("bpd,hde->bhpe", r, self.W_K)
        v = torch.einsum("bpd,hde->bhpe", r, self.W_V)
        att = torch.softmax(torch.einsum("bhe,bhpe->bhp", q, k) / math.sqrt(self.dh), -1)
        z = torch.einsum("bhp,bhpe->bhe", att, v).reshape(len(x), -1)
        h = r[:, -1] + z @ self.W_O
        h = h + F.relu(h @ self.W_in + self.b_in) @ self.W_out + self.b_out
        return h @ self.W_U


def make_data(p: int, frac: float, seed: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    y = (a + b) % p
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    n = int(frac * len(x))
    return x, y, perm[:n], perm[n:]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def weight_norm(model) -> float:
    return float(torch.sqrt(sum((q.detach() ** 2).sum() for q in model.parameters())))


def train_run(s: Settings, config: str, seed: int) -> dict:
    """One run; every step recorded for the first s.early steps, every s.every steps throughout."""
    x, y, tr, te = make_data(s.p, s.frac, seed)
    torch.manual_seed(seed)
    model = Transformer(s.p, s.d_model, s.d_mlp, s.heads)
    steps = s.constrained_steps if config == "constrained" else s.steps
    target = None
    if config == "constrained":
        with torch.no_grad():
            for q in model.parameters():
                q.mul_(s.alpha)
        target = weight_norm(model)
    wd = s.wd if config == "grok" else 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=wd, betas=(0.9, 0.98))
    log = {"step": [], "train_acc": [], "test_acc": [], "train_loss": [], "norm": []}
    rec_early = Recording(model, every=1, initial=True)
    rec_full = Recording(model, every=s.every, initial=True) if config != "constrained" else None
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step % s.eval_every == 0 or step == steps:
            with torch.no_grad():
                log["step"].append(step)
                log["train_loss"].append(float(F.cross_entropy(model(x[tr]), y[tr])))
                log["train_acc"].append(accuracy(model, x[tr], y[tr]))
                log["test_acc"].append(accuracy(model, x[te], y[te]))
                log["norm"].append(weight_norm(model))
        if step == steps:
            break
        loss = F.cross_entropy(model(x[tr]), y[tr])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not None:
            with torch.no_grad():
                scale = target / weight_norm(model)
                for q in model.parameters():
                    q.mul_(scale)
        if step < s.early:
            rec_early.step()
        if rec_full is not None:
            rec_full.step()
    secs = time.perf_counter() - t0
    out = {"config": config, "seed": seed, "log": log, "seconds": secs, "early": rec_early.trajectory(),
           "full": None if rec_full is None else rec_full.trajectory(), "model": model, "data": (x, y, tr, te)}
    out["t_mem"] = first_step(log, "train_acc", 0.99)
    out["t_grok"] = first_step(log, "test_acc", 0.9)
    out["t_half"] = first_step(log, "test_acc", 0.5)
    print(f"  {config} seed {seed}: {steps} steps in {secs:.0f} s; train {log['train_acc'][-1]:.3f}, "
          f"test {log['test_acc'][-1]:.3f}; memorised at {out['t_mem']}, test >= 0.9 at {out['t_grok']}", flush=True)
    return out


def first_step(log: dict, key: str, level: float):
    for st, v in zip(log["step"], log[key]):
        if v >= level:
            return st
    return None


# ----------------------------------------------------------------------------------- comparisons
def compare(a, b, la, lb, out: Path | None, fig_name: str | None, **kw) -> dict:
    t0 = time.perf_counter()
    cmp = compare_dynamics(a, b, labels=(la, lb), seed=0, progress=False, **kw)
    fig = cmp.plot(out / fig_name, title=f"{la}  vs.  {lb}") if (out is not None and fig_name) else None
    sa, sb = cmp.spectrum_a, cmp.spectrum_b
    row = {"a": la, "b": lb, "distance": float(cmp.distance), "p_value": float(cmp.p_value),
           "statistic": float(cmp.statistic), "null_median": float(np.median(cmp.null)),
           "ratio": float(cmp.statistic / np.median(cmp.null)), "rank": cmp.rank, "window": cmp.window,
           "n_null": len(cmp.null), "one_step_a": float(sa.reconstruction_error),
           "one_step_b": float(sb.reconstruction_error), "max_abs_a": float(abs(sa.eigenvalues).max()),
           "max_abs_b": float(abs(sb.eigenvalues).max()),
           "eigenvalues_a": [[float(z.real), float(z.imag)] for z in sa.eigenvalues],
           "eigenvalues_b": [[float(z.real), float(z.imag)] for z in sb.eigenvalues],
           "finite": bool(np.all(np.isfinite(sa.eigenvalues)) and np.all(np.isfinite(sb.eigenvalues))),
           "seconds": time.perf_counter() - t0, "figure": None if fig is None else str(fig), "notes": list(cmp.notes)}
    print(f"    {la} vs. {lb}: W1 {row['distance']:.4f}, p = {row['p_value']:.3f}, between/within "
          f"{row['ratio']:.2f} (rank {row['rank']}, window {row['window']})", flush=True)
    return row


def label(run) -> str:
    return f"{run['config']} s{run['seed']}"


def early_comparisons(s: Settings, runs: list[dict], out: Path | None) -> dict:
    """The paper's comparison: the first s.early steps, every step."""
    kw = dict(delays=s.early_delays, rank=s.early_rank, window=s.early_window, n_null=s.n_null)
    by = {(r["config"], r["seed"]): r for r in runs}
    s0, s1 = s.seeds[0], s.seeds[-1]
    pairs = [(("grok", s0), ("grok", s1)), (("no-wd", s0), ("no-wd", s1)), (("constrained", s0), ("constrained", s1))]
    for sd in s.seeds:
        pairs += [(("grok", sd), ("no-wd", sd)), (("grok", sd), ("constrained", sd))]
    res = {}
    for obs, okw in [("W_out", dict(observable="layer", layer="W_out", n_components=10)),
                     ("pca", dict(observable="pca", n_components=10))]:
        print(f"  first {s.early} steps, observable {obs}:")
        rows = []
        for k, (a, b) in enumerate(pairs):
            if a == b:
                continue
            fig = f"early_{obs}_{a[0]}{a[1]}_{b[0]}{b[1]}.png" if (obs == "W_out" and a[1] == s0) else None
            rows.append(compare(by[a]["early"], by[b]["early"], label(by[a]), label(by[b]), out, fig, **kw, **okw))
        res[obs] = rows
    return res


def full_comparisons(s: Settings, runs: list[dict], out: Path | None) -> list[dict]:
    by = {(r["config"], r["seed"]): r for r in runs}
    s0, s1 = s.seeds[0], s.seeds[-1]
    pairs = [(("grok", s0), ("grok", s1)), (("no-wd", s0), ("no-wd", s1))] + \
            [(("grok", sd), ("no-wd", sd)) for sd in s.seeds]
    print("  whole runs, 10 principal coordinates of all weights:")
    rows = []
    for a, b in pairs:
        if a == b:
            continue
        fig = f"full_{a[0]}{a[1]}_{b[0]}{b[1]}.png" if a[1] == s0 else None
        rows.append(compare(by[a]["full"], by[b]["full"], label(by[a]), label(by[b]), out, fig,
                            delays=s.delays, n_components=10, n_null=s.n_null))
    return rows


def window_comparisons(s: Settings, runs: list[dict], out: Path | None) -> list[dict]:
    """Within each grokking run: equal windows just before / just after the grokking step."""
    rows = []
    print(f"  within grokking runs, before vs. after the grokking step ({s.window_delays} delays):")
    for r in runs:
        if r["config"] != "grok" or r["t_grok"] is None or r["t_mem"] is None:
            continue
        traj = r["full"]
        steps = list(traj.steps)
        g = steps.index(min(steps, key=lambda st: abs(st - r["t_grok"])))
        m = steps.index(min(steps, key=lambda st: abs(st - r["t_mem"])))
        n = min(g - m, len(steps) - g)
        need = 2 * (s.window_delays + 6)
        if n < need:
            print(f"    {label(r)}: windows of {n} samples are too short; skipped")
            rows.append({"run": label(r), "skipped": f"windows of {n} samples (< {need})"})
            continue
        before, after = traj.window(g - n, g), traj.window(g, g + n)
        row = compare(before, after, f"{label(r)} steps {steps[g - n]}-{steps[g - 1]}",
                      f"{label(r)} steps {steps[g]}-{steps[g + n - 1]}", out,
                      f"window_{r['config']}{r['seed']}.png" if r["seed"] == s.seeds[0] else None,
                      delays=s.window_delays, n_components=10, n_null=s.n_null)
        row.update(run=label(r), before=[steps[g - n], steps[g - 1]], after=[steps[g], steps[g + n - 1]])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- CMD modes
def fourier_power(emb: np.ndarray, p: int) -> np.ndarray:
    """Power of the token-embedding rows 0..p-1 at frequencies 0..p//2 (summed over dimensions)."""
    f = np.fft.rfft(emb[:p], axis=0)
    return (np.abs(f) ** 2).sum(1)


def key_frequencies(emb: np.ndarray, p: int, k: int) -> list[int]:
    pw = fourier_power(emb - emb[:p].mean(0), p)[1:]
    return [int(i) + 1 for i in np.argsort(pw)[::-1][:k]]


def mode_analysis(s: Settings, run: dict, out: Path | None) -> dict:
    traj = run["full"]
    t0 = time.perf_counter()
    dec = modeopt.decompose(traj, n_modes=s.modes, seed=0, progress=False)
    secs = time.perf_counter() - t0
    W = traj.rows(0, traj.n_weights, dtype=torch.float64)
    R = dec.reconstruct().to(torch.float64)
    moved = W - W[:, :1]
    rel_err = float(torch.linalg.norm(W - R) / torch.linalg.norm(W))
    rel_err_moved = float(torch.linalg.norm(W - R) / torch.linalg.norm(moved))
    layout = traj.layout
    labels = dec.labels.numpy()
    const = dec.constant.numpy()
    # which tensors fall in which mode
    tensors = {}
    for name in layout.names:
        spec = layout[name]
        lab = labels[spec.offset:spec.stop]
        tensors[name] = [int((lab == m).sum()) for m in range(dec.n_modes)]
    # test accuracy of the reconstructed model along the run
    x, y, tr, te = run["data"]
    model = run["model"]
    saved = {k: v.detach().clone() for k, v in model.named_parameters()}
    T = traj.n_samples
    idx = sorted(set(np.linspace(0, T - 1, min(T, 40)).round().astype(int).tolist()))
    rec_acc = []
    for t in idx:
        dec.load_into(model, t)
        rec_acc.append({"step": int(traj.steps[t]), "train": accuracy(model, x[tr], y[tr]),
                        "test": accuracy(model, x[te], y[te])})
    with torch.no_grad():
        for k, q in model.named_parameters():
            q.copy_(saved[k])
    # the token embedding: Fourier content of each mode's weights
    p, d = s.p, s.d_model
    spec = layout["W_E"]
    lab_e = labels[spec.offset:spec.stop].reshape(p + 1, d)
    We = W[spec.offset:spec.stop].numpy().reshape(p + 1, d, T)
    keys = key_frequencies(We[:, :, -1], p, 5)
    n_freq = p // 2
    per_mode = []
    for m in range(dec.n_modes):
        mask = (lab_e[:p] == m)
        if mask.sum() == 0:
            per_mode.append({"mode": m, "n": 0})
            continue
        final = np.where(mask, We[:p, :, -1] - We[:p, :, -1].mean(0, keepdims=True), 0.0)
        delta = np.where(mask, We[:p, :, -1] - We[:p, :, 0], 0.0)
        pf, pdl = fourier_power(final, p)[1:], fourier_power(delta, p)[1:]
        cols = np.nonzero(mask.all(0))[0]
        per_mode.append({"mode": m, "n": int(mask.sum()), "whole_dims": int(len(cols)),
                         "key_share_final": float(pf[np.array(keys) - 1].sum() / max(pf.sum(), 1e-30)),
                         "key_share_moved": float(pdl[np.array(keys) - 1].sum() / max(pdl.sum(), 1e-30)),
                         "top_freqs_final": [int(i) + 1 for i in np.argsort(pf)[::-1][:5]]})
    # are the embedding's mode labels constant along dimensions (columns) or along tokens (rows)?
    def purity(a, axis):
        return float(np.mean([np.bincount(v, minlength=dec.n_modes).max() / len(v)
                              for v in (a.T if axis == 0 else a)]))
    purity_dims = purity(lab_e[:p], 0)    # a column = one embedding dimension across tokens
    purity_tokens = purity(lab_e[:p], 1)  # a row = one token's embedding
    # Fourier sparsity over time (progress measure), true and reconstructed
    Re = R[spec.offset:spec.stop].numpy().reshape(p + 1, d, T)

    def sparsity(E):
        pw = fourier_power(E[:p] - E[:p].mean(0, keepdims=True), p)[1:]
        return float(pw[np.array(keys) - 1].sum() / pw.sum())
    spars = [{"step": int(traj.steps[t]), "true": sparsity(We[:, :, t]), "cmd": sparsity(Re[:, :, t])} for t in idx]
    # reference profiles: the step of fastest change of each mode
    prof = dec.profiles.numpy()
    steps = np.array(traj.steps)
    fastest = []
    for m in range(dec.n_modes):
        v = np.abs(np.diff(prof[m])) / (np.ptp(prof[m]) + 1e-30)
        lo = np.searchsorted(steps, run["t_mem"] or 0)  # after memorisation
        fastest.append({"overall": int(steps[1:][int(np.argmax(v))]),
                        "after_memorisation": int(steps[1:][lo + int(np.argmax(v[lo:]))]) if lo < len(v) else None})
    res = {"run": label(run), "n_modes": dec.n_modes, "sizes": dec.sizes.tolist(), "n_constant": int(const.sum()),
           "reference": [layout.locate(int(i))[0] + str(list(layout.locate(int(i))[1])) for i in dec.reference],
           "rel_error": rel_err, "rel_error_of_movement": rel_err_moved, "seconds": secs,
           "tensors": tensors, "reconstructed_accuracy": rec_acc, "key_frequencies": keys,
           "embedding_modes": per_mode, "label_purity_dims": purity_dims, "label_purity_tokens": purity_tokens,
           "fourier_sparsity": spars, "fastest_change_step": fastest, "t_mem": run["t_mem"], "t_grok": run["t_grok"]}
    print(f"  CMD {label(run)}: M={dec.n_modes}, sizes {res['sizes']}, rel. error {rel_err:.4f} "
          f"(of the movement {rel_err_moved:.3f}), {secs:.1f} s; key frequencies {keys}", flush=True)
    res["_dec"] = dec
    res["_lab_e"] = lab_e
    return res


# ----------------------------------------------------------------------------------- figures
def plot_accuracy(s: Settings, runs: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"grok": "tab:blue", "no-wd": "tab:red", "constrained": "tab:green"}
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in runs:
        lg = r["log"]
        ls = "-" if r["seed"] == s.seeds[0] else ":"
        for k, key in enumerate(("train_acc", "test_acc")):
            ax[k].plot(np.maximum(lg["step"], 1), lg[key], ls, color=colors[r["config"]], label=label(r))
    for k, t in enumerate(("train accuracy", "test accuracy")):
        ax[k].set_xscale("log")
        ax[k].set_xlabel("step")
        ax[k].set_title(t)
        ax[k].axvline(s.early, color="gray", lw=0.6, ls="--")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"1-layer transformer, (a+b) mod {s.p}, {int(s.frac * 100)} % train; dashed line: the "
                 f"first {s.early} steps (the paper's window)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_modes(s: Settings, runs: list[dict], cmds: list[dict], path: Path) -> Path:
    """Per run (grok seed 0, no-wd seed 0): reference profiles + test accuracy; embedding mode labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    cmap = plt.get_cmap("tab10")
    for row, (r, c) in enumerate(zip(runs, cmds)):
        dec, steps = c["_dec"], np.array(r["full"].steps)
        a = ax[row, 0]
        for m in range(dec.n_modes):
            pr = dec.profiles[m].numpy()
            a.plot(steps, (pr - pr[0]) / (np.abs(pr - pr[0]).max() + 1e-30), color=cmap(m % 10), lw=1,
                   label=f"mode {m} ({int(dec.sizes[m])})")
        a2 = a.twinx()
        a2.plot(r["log"]["step"], r["log"]["test_acc"], "k--", lw=1.2, label="test acc.")
        a2.plot(r["log"]["step"], r["log"]["train_acc"], color="gray", ls=":", lw=1.2, label="train acc.")
        ra = c["reconstructed_accuracy"]
        a2.plot([q["step"] for q in ra], [q["test"] for q in ra], "k.", ms=4, label="test acc., CMD model")
        a2.set_ylim(-0.02, 1.02)
        for t, nm in ((r["t_mem"], "mem."), (r["t_grok"], "grok")):
            if t is not None:
                a.axvline(t, color="k", lw=0.6)
                a.text(t, 1.02, nm, fontsize=7, transform=a.get_xaxis_transform())
        a.set_title(f"{label(r)}: reference profiles, (w_ref(t) - w_ref(0)) / max", fontsize=9)
        a.set_xlabel("step")
        a.legend(fontsize=6, loc="lower left", ncol=2)
        a2.legend(fontsize=6, loc="lower right")
        b = ax[row, 1]
        lab = c["_lab_e"][: s.p]
        order = np.lexsort((np.arange(lab.shape[1]), np.array([np.bincount(col, minlength=dec.n_modes).argmax()
                                                                for col in lab.T])))
        b.imshow(lab[:, order], aspect="auto", cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest")
        b.set_title("mode of each token-embedding weight\n(rows: tokens 0..p-1; columns: dims, sorted)", fontsize=8)
        b.set_ylabel("token")
        cc = ax[row, 2]
        E = r["full"].rows(*[(sp.offset, sp.stop) for sp in [r["full"].layout["W_E"]]][0]).numpy()
        E = E.reshape(s.p + 1, s.d_model, -1)
        for t, ls in ((0, ":"), (E.shape[2] - 1, "-")):
            pw = fourier_power(E[:, :, t] - E[: s.p, :, t].mean(0, keepdims=True), s.p)[1:]
            cc.plot(np.arange(1, len(pw) + 1), pw / pw.sum(), ls, color="k", lw=1,
                    label=f"step {r['full'].steps[t]}")
        cc.set_title(f"Fourier power of W_E over tokens; key freqs {c['key_frequencies']}", fontsize=8)
        cc.set_xlabel("frequency k")
        cc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=105)
    plt.close(fig)
    return path


def plot_mode_fourier(s: Settings, cmds: list[dict], path: Path) -> Path:
    """Share of each mode's embedding Fourier power on the key frequencies (grok vs. no-wd)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    for k, c in enumerate(cmds):
        pm = [q for q in c["embedding_modes"] if q.get("n", 0) > 0]
        xs = [q["mode"] for q in pm]
        ax[k].bar(np.array(xs) - 0.2, [q["key_share_final"] for q in pm], 0.4, label="final weights")
        ax[k].bar(np.array(xs) + 0.2, [q["key_share_moved"] for q in pm], 0.4, label="movement (final - init)")
        ax[k].axhline(5 / (s.p // 2), color="gray", ls="--", lw=0.8, label="uniform spectrum")
        for q in pm:
            ax[k].text(q["mode"], 1.01, str(q["n"]), ha="center", fontsize=7)
        ax[k].set_ylim(0, 1.1)
        ax[k].set_xlabel("mode (number of embedding weights above)")
        ax[k].set_title(f"{c['run']}: share of W_E power on key freqs {c['key_frequencies']}", fontsize=8)
        ax[k].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- main
def run_study(s: Settings, out: Path | None) -> dict:
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    print("training:", flush=True)
    runs = [train_run(s, c, sd) for c in ("grok", "no-wd", "constrained") for sd in s.seeds]
    t_train = time.perf_counter() - t_all
    print("comparisons:", flush=True)
    early = early_comparisons(s, runs, out)
    full = full_comparisons(s, runs, out)
    windows = window_comparisons(s, runs, out)
    print("CMD:", flush=True)
    cmds = [mode_analysis(s, r, out) for r in runs if r["config"] != "constrained"]
    figs = {}
    if out is not None:
        figs["accuracy"] = str(plot_accuracy(s, runs, out / "accuracy.png"))
        pick = [(r, c) for r, c in zip([r for r in runs if r["config"] != "constrained"], cmds)
                if r["seed"] == s.seeds[0]]
        figs["modes"] = str(plot_modes(s, [q[0] for q in pick], [q[1] for q in pick], out / "modes.png"))
        figs["mode_fourier"] = str(plot_mode_fourier(s, [q[1] for q in pick], out / "mode_fourier.png"))
    result = {
        "settings": asdict(s), "configs": {k: v.format(wd=s.wd, alpha=s.alpha) for k, v in CONFIGS.items()},
        "runs": [{"run": label(r), "seconds": r["seconds"], "t_mem": r["t_mem"], "t_half": r["t_half"],
                  "t_grok": r["t_grok"], "final_train_acc": r["log"]["train_acc"][-1],
                  "final_test_acc": r["log"]["test_acc"][-1], "test_acc_at_early": acc_at(r["log"], s.early),
                  "train_acc_at_early": acc_at(r["log"], s.early, "train_acc"), "log": r["log"]} for r in runs],
        "early": early, "full": full, "windows": windows,
        "cmd": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cmds],
        "figures": figs, "train_seconds": t_train, "seconds": time.perf_counter() - t_all,
        "machine": f"{cpu_name()}, torch {torch.__version__}, 1 thread",
        "n_weights": runs[0]["early"].n_weights,
    }
    result["_runs"], result["_cmds"] = runs, cmds
    return result


def acc_at(log: dict, step: int, key: str = "test_acc") -> float:
    i = min(range(len(log["step"])), key=lambda j: abs(log["step"][j] - step))
    return log[key][i]


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(res: dict) -> str:
    s = res["settings"]
    L = [f"# Grokking study (examples/studies/grokking.py)", "",
         f"(a+b) mod {s['p']}, {int(s['frac'] * 100)} % of pairs for training, 1-layer transformer d_model "
         f"{s['d_model']}, d_mlp {s['d_mlp']}, {s['heads']} heads, no LayerNorm ({res['n_weights']:,} weights); "
         f"full batch AdamW lr {s['lr']:g}, betas (0.9, 0.98); seeds {s['seeds']}. Total {res['seconds']:.0f} s "
         f"(training {res['train_seconds']:.0f} s) on {res['machine']}.", "",
         "## Runs", "", "| run | steps (s) | memorised (train >= 0.99) | test >= 0.5 | test >= 0.9 | "
         f"test acc. at step {s['early']} | final train | final test |", "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        L.append(f"| {r['run']} | {r['log']['step'][-1]} ({r['seconds']:.0f}) | {fmt(r['t_mem'])} | {fmt(r['t_half'])} "
                 f"| {fmt(r['t_grok'])} | {r['test_acc_at_early']:.3f} | {r['final_train_acc']:.3f} | "
                 f"{r['final_test_acc']:.3f} |")

    def table(rows, title):
        L.extend(["", title, "", "| A | B | W1 (full) | p | median between / within | rank | window | "
                  "one-step err. A / B |", "|---|---|---|---|---|---|---|---|"])
        for q in rows:
            if "skipped" in q:
                L.append(f"| {q['run']} | skipped: {q['skipped']} | | | | | | |")
                continue
            L.append(f"| {q['a']} | {q['b']} | {q['distance']:.4f} | {q['p_value']:.3f} | "
                     f"{q['statistic']:.4f} / {q['null_median']:.4f} ({q['ratio']:.2f}) | {q['rank']} | "
                     f"{q['window']} | {q['one_step_a']:.3f} / {q['one_step_b']:.3f} |")
    table(res["early"]["W_out"], f"## First {s['early']} steps (the paper's window), observable W_out, 10 principal "
          f"coordinates, {s['early_delays']} delays, rank {s['early_rank']}")
    table(res["early"]["pca"], f"## First {s['early']} steps, observable: 10 principal coordinates of all weights")
    table(res["full"], f"## Whole runs (every {s['every']} steps), 10 principal coordinates, {s['delays']} delays")
    table(res["windows"], f"## Within grokking runs: before vs. after the step where test acc. reaches 0.9 "
          f"({s['window_delays']} delays)")
    L.extend(["", f"## CMD (M = {s['modes']}) of the whole runs", "",
              "| run | mode sizes | rel. error | rel. error of movement | key freqs | label purity dims / tokens | "
              "test acc. of CMD model (last) |", "|---|---|---|---|---|---|---|"])
    for c in res["cmd"]:
        L.append(f"| {c['run']} | {c['sizes']} | {c['rel_error']:.4f} | {c['rel_error_of_movement']:.3f} | "
                 f"{c['key_frequencies']} | {c['label_purity_dims']:.2f} / {c['label_purity_tokens']:.2f} | "
                 f"{c['reconstructed_accuracy'][-1]['test']:.3f} |")
    for c in res["cmd"]:
        L.extend(["", f"### {c['run']}: tensors per mode (weights), embedding Fourier content, fastest change", "",
                  "| mode | size | reference | " + " | ".join(c["tensors"]) + " | W_E key-freq share final / movement "
                  "| fastest change (step; after memorisation) |",
                  "|---" * (5 + len(c["tensors"])) + "|"])
        for m in range(c["n_modes"]):
            pm = c["embedding_modes"][m]
            ks = f"{pm['key_share_final']:.2f} / {pm['key_share_moved']:.2f}" if pm.get("n") else "-"
            fc = c["fastest_change_step"][m]
            L.append(f"| {m} | {c['sizes'][m]} | {c['reference'][m]} | " +
                     " | ".join(str(v[m]) for v in c["tensors"].values()) +
                     f" | {ks} | {fc['overall']}; {fmt(fc['after_memorisation'])} |")
        sp = c["fourier_sparsity"]
        L.extend(["", "Fourier sparsity of W_E (share of power on the key frequencies), true / CMD model: " +
                  ", ".join(f"step {q['step']}: {q['true']:.2f}/{q['cmd']:.2f}" for q in sp[:: max(1, len(sp) // 8)])])
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/studies/grokking")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke setting")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--modes", type=int)
    ap.add_argument("--images", action="store_true", help="copy the figures the docs show to docs/images/studies/")
    args = ap.parse_args(argv)
    s = Settings(**QUICK) if args.quick else Settings()
    for k in ("seeds", "steps", "modes"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    out = Path(args.out)
    res = run_study(s, out)
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / "grokking.json").write_text(json.dumps(clean, indent=1))
    (out / "grokking.md").write_text(markdown(clean))
    print(f"wrote {out}/grokking.json, .md and figures; {res['seconds']:.0f} s in all")
    if args.images:
        dst = REPO / "docs" / "images" / "studies"
        dst.mkdir(parents=True, exist_ok=True)
        names = ["accuracy.png", "modes.png", "mode_fourier.png",
                 f"early_W_out_grok{s.seeds[0]}_no-wd{s.seeds[0]}.png",
                 f"early_W_out_grok{s.seeds[0]}_constrained{s.seeds[0]}.png",
                 f"early_W_out_grok{s.seeds[0]}_grok{s.seeds[-1]}.png",
                 f"full_grok{s.seeds[0]}_no-wd{s.seeds[0]}.png", f"window_grok{s.seeds[0]}.png"]
        for n in names:
            if (out / n).exists():
                shutil.copy(out / n, dst / f"grokking_{n}")
        print(f"copied figures to {dst}")
    return res


if __name__ == "__main__":
    main()
